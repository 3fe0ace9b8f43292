"""The sparsecpu-bench command (torch_sparsecpu/bench/): bad arguments are refused in one
line with exit status 2, a real run checks every path before timing it and writes one
record per path, a wrong path stops the run, --decode times generate(); and the model
builders it shares with the demo prune the layers they say. Timings are never asserted."""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import torch_sparsecpu
from torch_sparsecpu.backend import sparsecpu_backend
from torch_sparsecpu.bench import cli, measure
from torch_sparsecpu.bench.measure import percentile, relative_error
from torch_sparsecpu.bench.models import IMAGE, ConfigFieldError, build_model, is_causal_lm_type, resolve_model

REPO = Path(__file__).resolve().parents[1]
# A small mlp: 64 -> 256 -> GELU -> 64 on 8 rows, so compiling and timing take seconds.
TINY_MLP = ["--model", "mlp", "--config", "hidden_size=64", "--config", "intermediate_size=256", "--seq", "8"]
TINY_LLAMA_CONFIG = {
    "num_hidden_layers": 1,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 2,
    "vocab_size": 128,
}
TINY_LLAMA = ["--model", "llama-tiny", *(f"--config={k}={v}" for k, v in TINY_LLAMA_CONFIG.items()), "--seq", "8"]
REQUIRED_KEYS = {"path", "median_ms", "p90_ms", "speedup", "compile_s", "model", "sparsity", "block", "batch", "seq"}
REQUIRED_KEYS |= {"threads", "throughput", "peak_rss_mb", "environment"}


@pytest.mark.parametrize(
    "arguments, named",
    [
        (["--model", "no-such-model"], "--model"),
        (["--sparsity", "1.0"], "--sparsity"),
        (["--sparsity", "-0.1"], "--sparsity"),
        (["--compare", "eager,tensorrt"], "--compare"),
        (["--threads", "0"], "--threads"),
        (["--batch", "two"], "--batch"),
        (["--block", "4x4"], "--block"),
        (["--block", "2x2"], "--block"),
        (["--compare", "eager,sparsecpu-int4"], "--compare"),
        (["--decode", "8"], "--decode"),  # the default mlp generates nothing
        (["--model", "bert-base", "--decode", "8"], "--decode"),
        (["--model", "llama-tiny", "--decode", "1"], "--decode"),
        (["--config", "no_such_field=1"], "--config"),
        (["--config", "hidden_size"], "--config"),
        (["--model", "bert-base", "--seq", "1000"], "--seq"),
        (["--json", "/no/such/folder/r.json"], "--json"),
    ],
)
def test_bad_argument_exits_2_with_one_line_naming_it(arguments, named, capsys):
    with pytest.raises(SystemExit) as exited:
        cli.main(arguments)
    assert exited.value.code == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and named in lines[0], captured.err
    assert captured.out == ""


def test_plot_without_matplotlib_is_an_argument_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    with pytest.raises(SystemExit) as exited:
        cli.main(["--plot", str(tmp_path / "bench.png")])
    assert exited.value.code == 2 and "--plot: needs matplotlib" in capsys.readouterr().err


def test_no_progress_bars_without_tqdm(monkeypatch):
    rounds = range(3)
    monkeypatch.setitem(sys.modules, "tqdm", None)
    assert cli._progress(rounds, "timing") is rounds


def test_block_error_says_which_blocks_exist(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--block", "2x2"])
    message = capsys.readouterr().err
    assert all(shape in message for shape in ("1x1", "4x1", "1x4")), message


def test_tiny_run_checks_times_and_writes_records(tmp_path, capsys):
    records_path = tmp_path / "r.json"
    arguments = [*TINY_MLP, "--compare", "eager,sparsecpu", "--repeats", "3", "--warmup", "1", "--threads", "1"]
    assert cli.main([*arguments, "--json", str(records_path)]) == 0
    records = json.loads(records_path.read_text())
    assert [record["path"] for record in records] == ["eager", "sparsecpu"]
    for record in records:
        assert REQUIRED_KEYS <= record.keys(), REQUIRED_KEYS - record.keys()
        assert (record["model"], record["sparsity"], record["block"], record["seq"]) == ("mlp", 0.9, "1x1", 8)
        assert (record["batch"], record["threads"]) == (1, 1)
        assert 0 < record["median_ms"] <= record["p90_ms"]
        assert record["compile_s"] > 0 and record["peak_rss_mb"] > 0
        assert math.isclose(record["throughput"], record["batch"] * 1e3 / record["median_ms"])
        assert math.isclose(record["speedup"], records[0]["median_ms"] / record["median_ms"])
    eager, sparse = records
    assert eager["speedup"] == 1.0 and eager["max_error"] == 0.0
    assert sparse["max_error"] <= 1e-5
    assert sparse["sparse_layers"] == "2/2"
    table = capsys.readouterr().out
    assert any(line.startswith("sparsecpu ") for line in table.splitlines()), table


def test_int8_path_checks_against_eager_then_writes_records(tmp_path, capsys):
    """sparsecpu-int8 on the mlp pruned in 1x4 blocks: both layers sparse and int8 (the
    1 x 4 rule), within the int8 tolerance of eager but not within fp32's, timed with
    the others."""
    records_path = tmp_path / "r.json"
    arguments = [*TINY_MLP, "--block", "1x4", "--compare", "sparsecpu,sparsecpu-int8", "--repeats", "2"]
    assert cli.main([*arguments, "--warmup", "0", "--threads", "1", "--json", str(records_path)]) == 0
    records = json.loads(records_path.read_text())
    assert [record["path"] for record in records] == ["eager", "sparsecpu", "sparsecpu-int8"]
    eager, fp32, int8 = records
    for record in records:
        assert REQUIRED_KEYS <= record.keys(), REQUIRED_KEYS - record.keys()
        assert record["block"] == "1x4" and 0 < record["median_ms"] <= record["p90_ms"]
    assert fp32["sparse_layers"] == "2/2" and int8["sparse_layers"] == "2/2, 2 int8"
    assert fp32["max_error"] <= 1e-5 < int8["max_error"] <= cli.INT8_TOLERANCE
    assert "sparsecpu-int8: " in capsys.readouterr().out


def test_block_1x4_prunes_whole_blocks_of_4_inputs():
    spec = resolve_model("mlp", {"hidden_size": 64, "intermediate_size": 256})
    model = build_model(spec, sparsity=0.75, block_cols=4)
    for layer in (model.module[0], model.module[2]):
        blocks = layer.weight.reshape(layer.weight.size(0), -1, 4) == 0
        assert (blocks.all(2) == blocks.any(2)).all(), "a 1 x 4 block is partly zero"
        assert blocks.float().mean().item() == pytest.approx(0.75, abs=0.01)


def test_int8_decode_checks_logits_and_reports_token_agreement(tmp_path):
    records_path = tmp_path / "decode.json"
    arguments = [*TINY_LLAMA, "--decode", "4", "--compare", "sparsecpu-int8", "--repeats", "1"]
    assert cli.main([*arguments, "--warmup", "0", "--json", str(records_path)]) == 0
    eager, int8 = json.loads(records_path.read_text())
    assert int8["path"] == "sparsecpu-int8" and 0 <= int8["tokens_match"] <= 1
    assert 0 < int8["max_error"] <= cli.INT8_LOGITS_TOLERANCE  # the logits, against eager's on the same tokens
    assert int8["sparse_layers"].startswith("7/8")


def test_an_int8_path_off_its_tolerance_stops_the_run(monkeypatch, capsys):
    monkeypatch.setitem(cli.PATHS, "sparsecpu-int8", dataclasses.replace(cli.PATHS["sparsecpu-int8"], tolerance=1e-6))
    assert cli.main([*TINY_MLP, "--block", "1x4", "--compare", "sparsecpu-int8", "--repeats", "1"]) == 1
    assert "sparsecpu-int8's output differs from eager's" in capsys.readouterr().err


def _wrong_backend(gm, example_inputs):
    """A backend whose compiled graph adds 1 to every output."""
    return lambda *args: tuple(output + 1 for output in gm(*args))


def test_a_path_that_disagrees_with_eager_stops_the_run(monkeypatch, capsys):
    monkeypatch.setitem(cli.PATHS, "wrong", cli.BenchPath("adds 1", backend=_wrong_backend))
    assert cli.main([*TINY_MLP, "--compare", "wrong", "--repeats", "1", "--warmup", "0"]) == 1
    captured = capsys.readouterr()
    assert "wrong's output differs from eager's" in captured.err
    assert "median ms" not in captured.out  # no timings


def test_decode_checks_tokens_and_reports_prefill_and_decode(tmp_path, monkeypatch):
    """--decode through a path added as one table entry (the sparse backend with the eager
    inner compiler, quick to compile)."""
    monkeypatch.setitem(cli.PATHS, "sparsecpu-eager", cli.BenchPath("sparse", "sparsecpu", {"inner": "eager"}))
    records_path = tmp_path / "decode.json"
    arguments = [*TINY_LLAMA, "--decode", "4", "--compare", "sparsecpu-eager", "--repeats", "2", "--warmup", "0"]
    assert cli.main([*arguments, "--json", str(records_path)]) == 0
    eager, sparse = json.loads(records_path.read_text())
    assert (eager["path"], sparse["path"]) == ("eager", "sparsecpu-eager")
    for record in (eager, sparse):
        assert record["decode_tokens"] == 4 and record["tokens_match"] == 1.0
        assert 0 < record["prefill_ms"] <= record["prefill_p90_ms"]
        assert record["prefill_ms"] < record["median_ms"]  # generate() = prefill + 3 decode steps
        assert math.isclose(record["decode_tokens_per_s"], 1e3 / record["decode_ms_per_token"])
    # one decoder layer's 7 linears pruned and sparse; the LM head stays dense
    assert sparse["sparse_layers"] == "7/8"


def test_decode_compiles_prefill_and_decode_once_for_any_prompt_length():
    """--decode compiles the forward as README's recipe does (static KV cache,
    ``dynamic=True``): three prompt lengths in a row compile two graphs, prefill and
    decode, and no step recompiles."""
    graphs = []

    def counting_sparsecpu(gm, example_inputs):
        graphs.append(gm)
        return sparsecpu_backend(gm, example_inputs, options={"inner": "eager"})

    spec = resolve_model("llama-tiny", TINY_LLAMA_CONFIG)
    model = build_model(spec, sparsity=0.7, seq=8)
    runner = cli._with_compiled_forward(model.module, cli.BenchPath("counting", counting_sparsecpu))
    for length in (8, 11, 13):
        cli._generate_timed(runner, torch.randint(0, 64, (1, length)), new_tokens=3)
        assert len(graphs) == 2, f"{len(graphs)} graphs after a prompt of {length} tokens"


def test_int8_layer_counts_of_prompt_and_decode_step_apart():
    """Under quantize="int8", zeros anywhere: the 8-token prompt's linears stay fp32 and a
    one-token decode step's run int8 (ops.int8_pays); --decode reports both."""
    spec = resolve_model("llama-tiny", TINY_LLAMA_CONFIG)
    model = build_model(spec, sparsity=0.7, seq=8)
    assert torch_sparsecpu._C.MAX_GEMV_TOKENS < 8
    counts = cli._sparse_layers(model, cli.PATHS["sparsecpu-int8"], decode=True)
    assert counts == "7/8, int8: 0 in the prompt, 7 in a decode step", counts


def test_python_dash_m_help():
    proc = subprocess.run(
        [sys.executable, "-m", "torch_sparsecpu.bench", "--help"], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: sparsecpu-bench") and "--decode" in proc.stdout


def test_console_script_names_main():
    tomllib = pytest.importorskip("tomllib")
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    module_name, _, function = scripts["sparsecpu-bench"].partition(":")
    assert getattr(importlib.import_module(module_name), function) is cli.main


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    records = [
        {"path": "eager", "median_ms": 4.0, "p90_ms": 5.0, "speedup": 1.0},
        {"path": "sparsecpu", "median_ms": 1.0, "p90_ms": 1.5, "speedup": 4.0},
    ]
    cli.plot(records, tmp_path / "bench.png", "test", decode=False)
    assert (tmp_path / "bench.png").read_bytes().startswith(b"\x89PNG")


# --------------------------------------------------------------------------- models, measures


def test_gpt2_conv1d_pruned_in_4x1_blocks_along_outputs_embeddings_dense():
    spec = resolve_model("gpt2", {"n_layer": 1, "n_embd": 64, "n_head": 2, "vocab_size": 128, "n_positions": 32})
    model = build_model(spec, sparsity=0.5, block_rows=4)
    transformer = model.module.transformer
    conv1d_layers = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    assert model.pruned_layers == [f"transformer.h.0.{name}" for name in conv1d_layers]
    for name in model.pruned_layers:
        weight = model.module.get_submodule(name).weight  # Conv1D: [in, out]
        blocks = weight.t().reshape(weight.size(1) // 4, 4, weight.size(0)) == 0
        assert (blocks.all(1) == blocks.any(1)).all(), f"{name}: a 4 x 1 block is partly zero"
        assert blocks.float().mean().item() == pytest.approx(0.5, abs=0.01), name
    # the LM head shares the token embedding's weight: neither was pruned
    assert model.module.lm_head.weight is transformer.wte.weight
    assert (transformer.wte.weight != 0).all() and (transformer.wpe.weight != 0).all()


def test_named_models_prune_only_their_recipe_layers():
    spec = resolve_model("llama-tiny", TINY_LLAMA_CONFIG)
    model = build_model(spec, sparsity=0.9)
    linears = {name for name, m in model.module.named_modules() if isinstance(m, nn.Linear)}
    assert set(model.pruned_layers) == linears - {"lm_head"}
    assert (model.module.lm_head.weight != 0).all()
    assert spec.causal_lm and is_causal_lm_type("gpt2") and not is_causal_lm_type("bert")
    assert resolve_model("vit").input_kind == IMAGE


def test_config_field_errors_suggest_the_field_meant():
    with pytest.raises(ConfigFieldError, match="no field 'hidden_siz'; did you mean hidden_size"):
        resolve_model("gpt2", {"hidden_siz": 64})  # an alias of GPT2Config's n_embd
    with pytest.raises(ConfigFieldError, match="did you mean intermediate_size"):
        resolve_model("mlp", {"intermediate": 64})


def test_percentile_interpolates_like_torch_quantile():
    samples = torch.rand(17, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for q in (0, 10, 50, 90, 100):
        assert percentile(samples.tolist(), q) == pytest.approx(torch.quantile(samples, q / 100).item())


def test_relative_error_counts_nan_and_shape_as_wrong():
    expected = torch.tensor([1.0, -4.0])
    assert relative_error(torch.tensor([1.0, -3.0]), expected) == pytest.approx(0.25)
    assert relative_error(torch.tensor([1.0, math.nan]), expected) == math.inf
    assert relative_error(torch.ones(3), expected) == math.inf
    assert relative_error(torch.zeros(2), torch.zeros(2)) == 0.0


@pytest.mark.parametrize(
    "variable, value, sleeps",
    [
        ("OMP_WAIT_POLICY", "passive", True),
        ("OMP_WAIT_POLICY", "PASSIVE", True),
        ("OMP_WAIT_POLICY", "active", False),
        ("GOMP_SPINCOUNT", "0", True),
        ("GOMP_SPINCOUNT", "300000", False),
        ("KMP_BLOCKTIME", "0", True),
        ("OMP_PROC_BIND", "close", False),
    ],
)
def test_timing_environment_is_recorded_and_sleeping_threads_warned(variable, value, sleeps, monkeypatch):
    for name in measure.TIMING_ENVIRONMENT:
        monkeypatch.delenv(name, raising=False)
    assert measure.timing_environment() == {}
    monkeypatch.setenv(variable, value)
    assert measure.timing_environment() == {variable: value}
    warning = measure.sleeping_threads_warning(measure.timing_environment())
    if sleeps:
        assert warning is not None and f"{variable}={value}" in warning and "read too high" in warning
    else:
        assert warning is None


def test_a_run_with_sleeping_threads_warns_once_and_records_it(tmp_path, monkeypatch, capsys):
    """OMP_WAIT_POLICY=passive inflates speed-ups against eager (docs/benchmarks.md): the
    run says so on stderr, once however many rounds, and its records and header keep it."""
    monkeypatch.setenv("OMP_WAIT_POLICY", "passive")
    measure._warn_once.cache_clear()
    records_path = tmp_path / "r.json"
    arguments = [*TINY_MLP, "--repeats", "2", "--warmup", "0", "--threads", "1", "--json", str(records_path)]
    assert cli.main(arguments) == 0
    captured = capsys.readouterr()
    assert captured.err.count("OMP_WAIT_POLICY=passive: idle OpenMP threads sleep") == 1, captured.err
    assert "environment: OMP_WAIT_POLICY=passive" in captured.out
    assert all(record["environment"]["OMP_WAIT_POLICY"] == "passive" for record in json.loads(records_path.read_text()))
