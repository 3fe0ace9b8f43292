"""Smoke tests of the benchmark scripts: they run, check before they time, and report what
they measured (the figures themselves are measured in benchmarks/, never here)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import torch_sparsecpu

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_conv  # noqa: E402
import bench_decode  # noqa: E402
import bench_ffn  # noqa: E402
import bench_linear  # noqa: E402
import bench_packing  # noqa: E402
import int8_accuracy  # noqa: E402

import common  # noqa: E402


def run_main(module, arguments: str) -> None:
    """Runs a benchmark script's main() with ``arguments`` (split on spaces); it must succeed."""
    assert module.main(arguments.split()) == 0


def test_bench_linear_prints_one_row_per_case(capsys):
    run_main(bench_linear, "--sparsities 90 --tokens 9 --threads 1 --min-run-time 0.01 --rounds 2")
    out = capsys.readouterr().out
    assert "2 cases x 2 round(s)" in out
    assert "median over 2 interleaved round(s)" in out
    rows = [line for line in out.splitlines() if line.startswith("bert.")]
    assert len(rows) == 2 and all(" 90 " in row and " 9 " in row for row in rows)


def test_bench_linear_quantize_int8_adds_the_int8_columns(capsys):
    run_main(bench_linear, "--sparsities 90 --tokens 9 --threads 1 --min-run-time 0.01 --block-cols 4 --quantize int8")
    out = capsys.readouterr().out
    assert "zeros in random 1x4 blocks" in out and "int8 x fp32" in out
    rows = [line.split() for line in out.splitlines() if line.startswith("bert.")]
    assert len(rows) == 2 and all(len(row) == 15 and float(row[-3]) > 0 for row in rows)


def test_sweep_refuses_a_wrong_int8_answer(monkeypatch):
    real = common.implementations

    def wrong_int8(layer, x):
        candidates = real(layer, x)
        right = candidates["sparsecpu_int8"]
        candidates["sparsecpu_int8"] = lambda: right() * (1 + 1e-3)  # within int8's error of dense, not exact
        return candidates

    monkeypatch.setattr(common, "implementations", wrong_int8)
    shape = common.LayerShape(name="tiny", model="test", out_features=16, in_features=24)
    with pytest.raises(common.ResultMismatch, match="int8 differs"):
        common.run_sweep(common.enumerate_cases([shape], [50], [5], [1]), 0.01, "test", quantize="int8")


def test_sweep_times_every_implementation_each_round(monkeypatch):
    calls = []
    monkeypatch.setattr(common, "median_ms", lambda fn, threads, min_run_time: calls.append(fn) or 1.0)
    shape = common.LayerShape(name="tiny", model="test", out_features=16, in_features=24)
    cases = common.enumerate_cases([shape], [90], [5], [1])
    results = common.run_sweep(cases, 0.01, "test", rounds=3)
    assert len(results) == 1 and len(calls) == 3 * 3
    assert results[0].sparsecpu_ms == results[0].dense_ms == 1.0


def test_sweep_refuses_to_time_a_wrong_answer(monkeypatch):
    real = common.implementations

    def wrong_sparsecpu(layer, x):
        candidates = real(layer, x)
        candidates["sparsecpu"] = lambda: torch.zeros_like(candidates["dense"]())
        return candidates

    monkeypatch.setattr(common, "implementations", wrong_sparsecpu)
    shape = common.LayerShape(name="tiny", model="test", out_features=16, in_features=24)
    with pytest.raises(common.ResultMismatch, match="sparsecpu differs"):
        common.run_sweep(common.enumerate_cases([shape], [50], [5], [1]), 0.01, "test")


def test_bench_ffn_checks_then_times_four_versions(capsys):
    run_main(bench_ffn, "--tokens 9 --threads 1 --rounds 2 --min-run-time 0.01")
    out = capsys.readouterr().out
    for name in ("eager dense", "compiled", "linear_chain", "two linear ops"):
        assert name in out
    assert "linear_chain / two linear ops, per round:" in out
    assert "compiled / linear_chain, per round:" in out


def test_bench_ffn_int8_in_1x4_blocks(capsys):
    run_main(bench_ffn, "--block-cols 4 --quantize int8 --tokens 9 --threads 1 --rounds 2 --min-run-time 0.01")
    out = capsys.readouterr().out
    assert "zeros in 1x4 blocks" in out and "compiled int8 / compiled, per round:" in out
    with pytest.raises(SystemExit):
        bench_ffn.main("--block-cols 4 --block-rows 4".split())


def test_bench_ffn_three_layers_with_overhead(capsys, monkeypatch):
    """The 3-layer MLP, with the zero-weight versions checked against their own result
    (every token's output is the last layer's activated bias) and the bound printed, timed
    by CPU time; CPU time on several threads is refused unless OpenMP threads sleep."""
    run_main(bench_ffn, "--layers 3 --overhead --cpu-time --tokens 9 --threads 1 --rounds 2 --min-run-time 0.01")
    out = capsys.readouterr().out
    assert "MLP 768->3072 GELU ->3072 ReLU ->768" in out and "CPU time of all threads" in out
    for name in ("three linear ops", "chain, zero weights", "ops, zero weights"):
        assert name in out
    assert "linear_chain / three linear ops, per round:" in out
    assert "three linear ops / chain if fusion removed only the overhead, per round:" in out
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    with pytest.raises(SystemExit):
        bench_ffn.main("--cpu-time --threads 2".split())


def test_bench_ffn_compiled_block_runs_one_chain():
    """The compiled candidate is what the must-show figure claims: both layers sparse, as
    one linear_chain (inference mode), with the benchmark's own weights."""
    w1 = common.random_sparse_weight(3072, 768, 90, seed=1)
    w2 = common.random_sparse_weight(768, 3072, 90, seed=2)
    b1, b2 = torch.randn(3072), torch.randn(768)
    model = bench_ffn.compiled_mlp([w1, w2], [b1, b2], ["gelu", "none"])
    assert torch.equal(model[0].weight, w1) and torch.equal(model[2].bias, b2)
    decisions = torch_sparsecpu.explain(model, torch.randn(4, 768))
    assert [d.taken for d in decisions] == [True, True]
    compiled = torch.compile(model, backend="sparsecpu")  # Inductor inside, as bench_ffn runs it
    with torch.inference_mode(), torch.profiler.profile() as profile:
        compiled(torch.randn(4, 768))
    assert "sparsecpu::linear_chain" in {event.name for event in profile.events()}


@pytest.mark.parametrize("block_rows", [1, 4])
def test_random_sparse_weight_zeros_exact_blocks(block_rows):
    weight = common.random_sparse_weight(64, 30, 90, seed=1, block_rows=block_rows)
    blocks = weight.reshape(64 // block_rows, block_rows, 30)
    zero = blocks.eq(0).all(dim=1)
    assert int(zero.sum()) == round(0.9 * zero.numel())
    assert bool(blocks.ne(0).all(dim=1).eq(~zero).all())  # a block is all zero or all nonzero


def test_bench_linear_block_rows_4_reported(capsys):
    run_main(bench_linear, "--sparsities 90 --tokens 9 --threads 1 --min-run-time 0.01 --block-rows 4")
    assert "zeros in random 4x1 blocks" in capsys.readouterr().out


def test_bench_packing_checks_then_times_each_packing(capsys):
    run_main(bench_packing, "--shape bert.output --tokens 9 --rounds 2 --min-run-time 0.01 --packings auto/32,0/128")
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines()[2:]]
    assert [row[0] for row in rows] == ["dense", "auto/32", "0/128"]
    assert all(float(row[1]) > 0 for row in rows)


def test_bench_packing_partly_filled_blocks_both_ways(capsys):
    blocks = "--block-rows 4 --fill 0.5 --packings auto/128/1,auto/128/4"
    run_main(bench_packing, f"--shape bert.output --tokens 9 --rounds 1 --min-run-time 0.01 {blocks}")
    out = capsys.readouterr().out
    assert "in 4x1 blocks filled 50%" in out
    assert [line.split()[0] for line in out.splitlines()[2:]] == ["dense", "auto/128/1", "auto/128/4"]
    with pytest.raises(SystemExit):  # --fill needs 4 x 1 blocks
        bench_packing.main(["--fill", "0.5"])


def test_check_then_time_refuses_a_wrong_candidate(monkeypatch):
    x = torch.randn(5, 3)
    timed = []
    monkeypatch.setattr(common, "median_ms", lambda fn, threads, min_run_time, clock: timed.append(fn) or 1.0)
    times = common.check_then_time({"ref": lambda: x, "same": lambda: x.clone()}, "ref", 1, 2, 0.01)
    assert times == {"ref": [1.0, 1.0], "same": [1.0, 1.0]} and len(timed) == 4
    with pytest.raises(SystemExit, match="wrong: wrong result"):
        common.check_then_time({"ref": lambda: x, "wrong": lambda: x + 1}, "ref", 1, 2, 0.01)
    with pytest.raises(SystemExit, match="nan: wrong result"):
        common.check_then_time({"ref": lambda: x, "nan": lambda: x * float("nan")}, "ref", 1, 2, 0.01)
    assert len(timed) == 4  # nothing timed after a wrong result


def test_bench_conv_times_each_distinct_convolution(capsys):
    pytest.importorskip("transformers")
    run_main(bench_conv, "--model mobilenetv2 --image 32 --threads 1 --rounds 1 --min-run-time 0.01")
    out = capsys.readouterr().out
    # MobileNetV2's 35 ungrouped convolutions (its 17 depthwise ones stay out).
    assert "all 35 ungrouped convolutions" in out
    rows = [line for line in out.splitlines() if line.strip().startswith("[1,")]
    assert rows and all(line.rstrip().split()[-1].replace(".", "").isdigit() for line in rows)


def test_bench_conv_chains_replays_each_conv_chain_call(capsys):
    pytest.importorskip("transformers")
    run_main(bench_conv, "--mode chains --model mobilenetv2 --image 32 --threads 2 --rounds 1 --min-run-time 0.01")
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    # MobileNetV2's 16 inverted residuals after the first, each one conv_chain call, each
    # timed under the planner, as bands and as a team; then the sums.
    assert [int(row[0]) for row in rows] == list(range(16))
    assert all(row[1].startswith("[1,") and all(float(column) > 0 for column in row[-3:]) for row in rows)
    total = next(line.split() for line in out.splitlines() if line.split()[:1] == ["all"])
    assert float(total[1]) == pytest.approx(sum(float(row[-3]) for row in rows), abs=0.01)


def test_bench_conv_forward_cuts_the_forward_at_each_conv_chain_call(capsys):
    pytest.importorskip("transformers")
    run_main(bench_conv, "--mode forward --model mobilenetv2 --image 32 --threads 2 --rounds 1 --min-run-time 0.01")
    out = capsys.readouterr().out
    pieces = {
        line.rsplit(None, 2)[0].strip(): float(line.split()[-2]) for line in out.splitlines() if line.endswith(" ms")
    }
    assert list(pieces) == ["forward", "before the first chain", "in the chains", "between chains", "after the last"]
    assert all(ms > 0 for ms in pieces.values())
    # Each piece is a part of every forward, so its median is at most the forward's.
    assert all(ms <= pieces["forward"] for ms in pieces.values())
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert [int(row[0]) for row in rows] == list(range(16))  # MobileNetV2's 16 conv_chain calls
    # Each call in the forward and alone; then the sums of both columns.
    assert all(float(row[-2]) > 0 and float(row[-1]) > 0 for row in rows)
    assert sum(float(row[-2]) for row in rows) == pytest.approx(pieces["in the chains"], rel=0.5)
    total = next(line.split() for line in out.splitlines() if line.split()[:1] == ["all"])
    assert float(total[1]) == pytest.approx(sum(float(row[-2]) for row in rows), abs=0.01)
    assert float(total[2]) == pytest.approx(sum(float(row[-1]) for row in rows), abs=0.01)


def test_bench_conv_dict_tag_guards_sets_dynamos_config_for_the_run_only(monkeypatch):
    seen = []
    monkeypatch.setitem(
        bench_conv.MODES, "layers", lambda args: seen.append(torch._dynamo.config.use_recursive_dict_tags_for_guards)
    )
    run_main(bench_conv, "--dict-tag-guards")
    run_main(bench_conv, "")
    assert seen == [True, False]
    assert not torch._dynamo.config.use_recursive_dict_tags_for_guards


@pytest.mark.slow
def test_bench_conv_blocks_fuses_each_bottleneck_into_one_op(capsys):
    pytest.importorskip("transformers")
    arguments = "--mode blocks --block stages.0.layers.1 --image 64 --threads 1 --rounds 1 --min-run-time 0.01"
    run_main(bench_conv, arguments)
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.strip().startswith("stages.0.layers.1"))
    # Three sparsecpu::conv2d calls unfused, one sparsecpu::conv_chain fused.
    assert row.split()[-2] == "3->1" and row.split()[-1].endswith("x")


@pytest.mark.slow
def test_bench_conv_blocks_fuses_each_inverted_residual_into_one_op(capsys):
    pytest.importorskip("transformers")
    arguments = "--mode blocks --model mobilenetv2 --block layer.1 --floor --image 64 --threads 1 --rounds 1"
    run_main(bench_conv, arguments + " --min-run-time 0.01")
    out = capsys.readouterr().out
    row = next(line.split() for line in out.splitlines() if line.strip().startswith("layer.1"))
    # Two sparsecpu::conv2d calls around the dense depthwise one unfused, one conv_chain fused;
    # then fused/unfused, the unfused and fused blocks at 99.9% zeros, the input + output
    # pass and the two bounds they give.
    assert row[-7] == "2->1" and row[-6].endswith("x") and row[-2].endswith("x") and row[-1].endswith("x")
    # Times are printed, not compared: one short round on a shared machine orders nothing.
    assert all(float(column) > 0 for column in (row[-9], row[-5], row[-4], row[-3]))


@pytest.mark.slow
def test_bench_conv_model_floor_splits_the_fused_forward(capsys):
    pytest.importorskip("transformers")
    run_main(
        bench_conv, "--mode model --model mobilenetv2 --floor --image 32 --threads 1 --rounds 1 --min-run-time 0.01"
    )
    lines = capsys.readouterr().out.splitlines()
    fused = next(float(line.split()[1]) for line in lines if line.split()[:1] == ["fused"])
    floor_line = next(line for line in lines if line.startswith("fused with 99.9% zeros"))
    floor, multiplies = (float(word) for word in re.findall(r"(-?[0-9.]+) ms", floor_line)[:2])
    # The split adds up (both printed to 2 decimals); times are not compared with each other.
    assert floor > 0 and abs(floor + multiplies - fused) <= 0.011
    rates = next(line for line in lines if line.startswith("multiplies"))
    # (A forward this small may leave the multiplies no time to rate.)
    assert "GFLOP/s over nonzeros per thread" in rates or "no time left to rate" in rates
    assert float(re.search(r"eager (-?[0-9.]+) GFLOP/s", rates).group(1)) > 0


def test_conv_flops_counts_nonzero_weights_of_ungrouped_convolutions_and_every_weight():
    ungrouped = nn.Conv2d(3, 4, 3, padding=1, bias=False)  # 8 x 8 output pixels
    depthwise = nn.Conv2d(4, 4, 3, groups=4, bias=False)  # 6 x 6
    with torch.no_grad():
        ungrouped.weight.fill_(1.0)
        ungrouped.weight[0].zero_()  # 27 of its 108 weights zero
    sparse, dense = bench_conv.conv_flops(nn.Sequential(ungrouped, depthwise), torch.randn(2, 3, 8, 8))
    assert sparse == 2 * (2 * 64) * 81  # 2 images; the depthwise layer's not counted
    assert dense == 2 * (2 * 64) * 108 + 2 * (2 * 36) * 36


def test_bench_decode_checks_tokens_then_times_each_sparsity(capsys):
    pytest.importorskip("transformers")
    tiny = "--layers 1 --hidden 64 --intermediate 128 --heads 2 --vocab 128 --prompt 9 --new-tokens 3"
    run_main(bench_decode, f"{tiny} --sparsities 70 --rounds 1 --inner eager")
    out = capsys.readouterr().out
    assert "tokens equal eager's at every sparsity" in out
    rows = [line.split() for line in out.splitlines() if line.lstrip()[:1].isdigit()]
    assert [row[0] for row in rows] == ["70%"]
    assert rows[0][-1] == "2", "prefill and decode: two graphs"
    assert all(float(cell) > 0 for cell in rows[0][1:7])


def test_bench_decode_quantize_int8_checks_logits_then_times_it(capsys, monkeypatch):
    pytest.importorskip("transformers")
    tiny = "--layers 1 --hidden 64 --intermediate 128 --heads 2 --vocab 128 --prompt 9 --new-tokens 3"
    run_main(bench_decode, f"{tiny} --sparsities 70 --rounds 1 --inner eager --quantize int8")
    out = capsys.readouterr().out
    table = out.split("--quantize int8")[1]
    rows = [line.split() for line in table.splitlines() if line.lstrip()[:1].isdigit()]
    assert [row[0] for row in rows] == ["70%"] and rows[0][-1] == "2", table
    error = float(rows[0][-2])
    assert 0 < error <= bench_decode.INT8_LOGITS_TOLERANCE  # int8: close to eager, never equal
    monkeypatch.setattr(bench_decode, "INT8_LOGITS_TOLERANCE", error / 2)
    with pytest.raises(SystemExit, match="int8 logits off eager's"):
        run_main(bench_decode, f"{tiny} --sparsities 70 --rounds 1 --inner eager --quantize int8")
    assert "generate ms" not in capsys.readouterr().out


def test_int8_accuracy_ours_no_worse_than_quantize_dynamic_on_a_small_ffn():
    """The accuracy report's claim on a small FFN (256 -> 512 -> GELU -> 256, 90% in 1 x 4
    blocks, 64 tokens): both layers int8, and their output no further from fp32 eager than
    torch.ao's dense dynamic quantization of the same model, by both measures."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 256)).eval()
    torch_sparsecpu.magnitude_prune_(model, 0.9, block_cols=4)
    result = int8_accuracy.errors(model, (torch.randn(64, 256),))
    assert result["int8 layers"] == (2, 2)
    ours, theirs = result["sparsecpu-int8"], result["quantize_dynamic"]
    assert 1e-4 < ours[0] <= theirs[0] and 1e-4 < ours[1] <= theirs[1], result  # quantized, and no worse
    assert result["sparsecpu fp32"][0] <= 1e-5
