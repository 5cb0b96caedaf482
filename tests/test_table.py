from mlx_kvshard.table import columns


def test_columns_align_each_column_to_its_widest_cell():
    assert columns([("rank", "weights"), ("0", "5.50 MiB"), ("10", "1 B")]) == [
        "rank   weights", "   0  5.50 MiB", "  10       1 B"]
    assert columns([("PASS", "mini-a", "ok"), ("", "", "fix: x")], "lll") == [
        "PASS  mini-a  ok", "              fix: x"]  # left-aligned: no trailing blanks
    assert columns([]) == []
