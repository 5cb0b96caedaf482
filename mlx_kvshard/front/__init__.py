"""The HTTP front that outlives the ranks (`serve --restart N`).

Without it rank 0's process holds the HTTP socket and every request, so losing any rank
(the whole group stops: DESIGN invariant 4) loses every request in flight. With
`--restart N` the front runs in the launcher process, which outlives every attempt: it
holds the HTTP port, the clients' connections and each request's prompt ids and the
tokens already sent. Rank 0's engine connects to it over an owner-only Unix socket (a
0700 directory, the launch's token in the hello; JSON lines of ids, integers and
sampling parameters, never pickle). When the group is lost the front keeps the
connections open (/health 503 with the reason), and once the relaunched group's rank 0
connects it resubmits every open request from its prompt + the tokens already sent, with
the same sampling key (serving.requests.Request.resume): the stream continues where it
stopped, no token repeated or lost. --migration-limit and --migration-timeout bound it.
"""
