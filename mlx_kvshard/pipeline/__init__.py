"""Pipeline stages (`--pp S`): the layers split into S contiguous stages, one rank each,
one activation passed per stage boundary per step (send/recv to the ring neighbour)."""
