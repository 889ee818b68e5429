"""The regression check itself: what it flags and what it lets through."""

import torch

from benchmarks import harness, regress

THRESHOLD = regress.THRESHOLDS["cpu"]


def doc(timings=None, counts=None):
    return {"timings": timings or {}, "counts": counts or {}}


def test_planted_30_percent_slowdown_is_caught():
    ok, table = regress.compare(doc({"bench_a": 1.30, "bench_b": 2.0}), doc({"bench_a": 1.0, "bench_b": 2.0}),
                                THRESHOLD)
    assert not ok
    assert "bench_a" in table and "REGRESSION" in table and "+30%" in table


def test_noise_within_threshold_passes():
    base = {f"bench_{i}": 1.0 + i for i in range(5)}
    noisy = {name: v * f for (name, v), f in zip(base.items(), [1.1, 0.9, 1.2, 0.85, 1.0])}
    ok, table = regress.compare(doc(noisy), doc(base), THRESHOLD)
    assert ok, table
    assert "REGRESSION" not in table


def test_any_rise_in_launch_count_is_caught():
    ok, table = regress.compare(doc(counts={"launches/decode_step[eager]": 41}),
                                doc(counts={"launches/decode_step[eager]": 40}), THRESHOLD)
    assert not ok and "+1" in table
    ok, _ = regress.compare(doc(counts={"launches/decode_step[eager]": 39}),
                            doc(counts={"launches/decode_step[eager]": 40}), THRESHOLD)
    assert ok


def test_missing_and_new_benchmarks_are_listed_not_failed():
    ok, table = regress.compare(doc({"new_one": 1.0}), doc({"old_one": 1.0}), THRESHOLD)
    assert ok
    assert "missing" in table and "new" in table


def test_launch_counter_is_deterministic_and_sees_extra_work():
    x = torch.randn(8, 8)

    def work(extra):
        y = (x @ x).relu()
        if extra:
            y = y * 2
        return y.view(-1).sum()

    counts = []
    for extra in (False, False, True):
        with harness.LaunchCounter().counting() as c:
            work(extra)
        counts.append(c.total)
    assert counts[0] == counts[1] > 0
    assert counts[2] == counts[0] + 1  # the view is free, the extra multiply is one launch


def test_launch_counter_counts_a_triton_launch_once():
    import triton  # qvl, imported by the harness, has already switched on the interpreter on CPU
    import triton.language as tl

    @triton.jit
    def _double_kernel(x_ptr, n, BLOCK: tl.constexpr):
        i = tl.arange(0, BLOCK)
        v = tl.load(x_ptr + i, mask=i < n)
        tl.store(x_ptr + i, v * 2, mask=i < n)

    x = torch.ones(5, device="cuda" if torch.cuda.is_available() else "cpu")
    with harness.LaunchCounter().counting() as c:
        _double_kernel[(1,)](x, 5, BLOCK=8)
    assert c.triton == 1 and c.aten == 0
    assert x.tolist() == [2.0] * 5


def test_results_table_names_the_run_and_every_figure():
    results = {
        "meta": {"device": "NVIDIA H200", "torch": "2.11.0", "triton": "3.6.0", "python": "3.12.3",
                 "date": "2026-11-26", "commit": "0123456789abcdef"},
        "figures": {"benchmarks/bench_norm.py::test_norm[qvl[triton]-16384x2048]":
                    {"median_s": 3.7e-5, "TB/s": 3.58, "of_copy_bandwidth": 0.97},
                    "benchmarks/bench_model.py::test_prefill[eager]": {"median_s": 0.0686}},
        "counts": {"launches/decoder_layer_decode[triton]": 11},
    }
    table = regress.results_table(results)
    assert table.startswith("Device: NVIDIA H200; torch 2.11.0; triton 3.6.0; python 3.12.3; 2026-11-26; "
                            "commit 0123456789")
    assert "| bench_norm: norm[qvl[triton]-16384x2048] | 0.037 | 3.58 TB/s | 97% copy bandwidth |" in table
    assert "| bench_model: prefill[eager] | 68.6 |  |  |" in table
    assert "| launches/decoder_layer_decode[triton] | 11 |" in table
