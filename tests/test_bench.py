"""`pha-lab bench` on CPU: the tiny run writes a well-formed CSV and an MLflow run, an OOM cell is recorded
and the run goes on, the FLOPs counts behind MFU match torch's counter, the GPT-2 reference and the
Lightning-vs-plain loops run. (The presets' training FLOPs are checked in test_presets.py.)"""

from __future__ import annotations

import json
import math
import re
import time

import pytest
import torch

from pha_lab.bench import dss_variants, efficiency, gpt2_reference, roofline, timing
from pha_lab.bench.report import COLUMNS, read_csv
from pha_lab.bench.spec import OverheadSpec, load_spec, plan
from pha_lab.bench.workloads import make_workload
from pha_lab.cli import main

TINY = [
    "models=[tiny_pha,tiny_transformer]",
    "seq_lens=[32,64]",
    "tokens_per_step=128",
    "steps=2",
    "branches.names=[gss,attn]",
    "targets.seq_len=32",
    "targets.batch_size=2",
]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def bench(tmp_path, *args: str) -> tuple[int, list[dict]]:
    out = tmp_path / "bench.csv"
    rc = main(["bench", *args, "--out", str(out), "--runs-dir", str(tmp_path / "runs")])
    return rc, read_csv(out)


def test_tiny_bench_writes_csv_header_and_mlflow_run(tmp_path, capsys):
    rc, rows = bench(tmp_path, "parts=[targets,models,branches,dss]", *TINY, "dss.variants=[chunked]", "--measure-peak")
    assert rc == 0
    text = (tmp_path / "bench.csv").read_text().splitlines()
    assert text[0].split(",") == COLUMNS
    # targets: gpt2_tiny + 2 presets; models: 2 x 2 modes x 2 lengths; branches: 2 x 2 x 2; dss: 1 x 2 x 2
    assert [r["part"] for r in rows] == ["targets"] * 3 + ["models"] * 8 + ["branches"] * 8 + ["dss"] * 4
    for r in rows:
        assert r["status"] == "ok", r
        assert r["tokens_per_step"] == r["seq_len"] * r["batch_size"]
        assert r["step_ms_p10"] <= r["step_ms_median"] <= r["step_ms_p90"]
        assert r["tokens_per_s"] == pytest.approx(r["tokens_per_step"] / (r["step_ms_median"] / 1e3), rel=1e-3)
        assert r["flops_per_step"] > 0 and r["min_bytes_gb"] > 0 and r["floor_ms"] > 0
        assert r["tflops"] * 1e12 == pytest.approx(r["flops_per_step"] / (r["step_ms_median"] / 1e3), rel=1e-3)
        assert 0 < r["mfu_measured_peak"] and math.isnan(r["mfu_datasheet"])  # no datasheet for a CPU
        assert r["dtype"] == "fp32" and r["torch"] == torch.__version__ and len(str(r["git_sha"])) >= 7
    models = {(r["model"], r["mode"], r["seq_len"]): r for r in rows if r["part"] == "models"}
    assert models["tiny_pha", "train", 32]["batch_size"] == 4 and models["tiny_pha", "train", 64]["batch_size"] == 2
    assert models["tiny_pha", "train", 64]["flops_per_step"] > 2.5 * models["tiny_pha", "prefill", 64]["flops_per_step"]
    assert {r["model"] for r in rows if r["part"] == "branches"} == {"tiny_pha:gss", "tiny_pha:attn"}
    assert {r["model"] for r in rows if r["part"] == "dss"} == {"tiny_pha:dss-chunked-32"}
    assert rows[0]["model"] == "gpt2_tiny" and rows[0]["n_params"] == gpt2_reference.build("gpt2_tiny", 32).n_params()
    # memory parts: fp32 weights; the inference cache of tiny_pha counted by hand (2 layers: K and V of 2 KV heads x 16
    # at fp32 per position, a complex fp32 state of H=32 x N=8); AdamW's two fp32 moments once the first training
    # cell has run (prefill ran first); no peak on a CPU, so no activations
    for (_, mode, _), r in models.items():
        assert r["weights_gb"] == pytest.approx(4 * r["n_params"] / 1e9, rel=1e-5)
        assert r["optimizer_gb"] == (0 if mode == "prefill" else pytest.approx(2 * r["weights_gb"], rel=0.01))
        assert math.isnan(r["activations_gb"]) and r["cache_gb"] > 0
    b = models["tiny_pha", "train", 64]["batch_size"]
    assert models["tiny_pha", "train", 64]["cache_gb"] == pytest.approx(
        (2 * (2 * 2 * 16 * 64 * b * 4) + 2 * (2 * 32 * 8 * b * 4)) / 1e9, rel=1e-5
    )
    assert all(math.isnan(r["cache_gb"]) for r in rows if r["part"] in ("branches", "dss"))

    header = json.loads((tmp_path / "bench.header.json").read_text())
    for key in ("date", "gpu", "driver", "torch", "git_sha", "dtype", "compile", "peak_tflops", "peak_source"):
        assert key in header
    from pha_lab import tracking

    assert (
        header["git_sha"] == tracking.git_info()["git_sha"] != "HEAD" and header["command"] == tracking.command_line()
    )
    printed = capsys.readouterr().out
    assert "# git_sha:" in printed and "tiny_transformer vs gpt2_tiny" in printed and "tok/s" in printed

    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["efficiency"])
    assert len(runs) == 1 and runs.loc[0, "status"] == "FINISHED"
    run = runs.iloc[0]
    assert run["metrics.tokens_per_s/models/tiny_pha/train/64"] == pytest.approx(
        models["tiny_pha", "train", 64]["tokens_per_s"], rel=1e-4
    )
    assert run["params.env.git_sha"] == header["git_sha"] and run["params.bench.tokens_per_step"] == "128"
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run["run_id"])}
    assert {"bench.csv", "bench.header.json", "bench.txt"} <= artifacts


def test_activations_are_the_peak_minus_weights_and_optimizer():
    """On a GPU the peak is measured: what is not weights or AdamW state is counted as activations."""
    from pha_lab.bench.workloads import memory_columns

    wl = make_workload("tiny_pha", "meta")
    cols = memory_columns(wl, 2, 64, 2, optimizer_bytes=2_000_000, peak_mem_gb=0.05)
    assert cols["weights_gb"] == pytest.approx(4 * wl.module.n_params() / 1e9)
    assert cols["activations_gb"] == pytest.approx(0.05 - cols["weights_gb"] - 0.002)
    assert cols["cache_gb"] == wl.module.cache_bytes(2, 64, 2) / 1e9  # bf16 on a GPU


def test_oom_cell_is_recorded_and_the_run_goes_on(tmp_path, monkeypatch):
    real = efficiency.build_step

    def build_step(mode, workload, fwd, optimizer, batches, amp):
        if mode == "train" and batches[0][0].shape[1] == 32:

            def step():
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 40.00 GiB")

            return step
        return real(mode, workload, fwd, optimizer, batches, amp)

    monkeypatch.setattr(efficiency, "build_step", build_step)
    rc, rows = bench(tmp_path, "parts=[models]", *TINY, "models=[tiny_pha]", "--no-mlflow")
    assert rc == 0
    status = {(r["mode"], r["seq_len"]): r for r in rows}
    assert status["train", 32]["status"] == "OOM" and "out of memory" in status["train", 32]["note"]
    assert math.isnan(status["train", 32]["tokens_per_s"]) and status["train", 32]["flops_per_step"] > 0
    assert [status[k]["status"] for k in [("prefill", 32), ("prefill", 64), ("train", 64)]] == ["ok"] * 3

    # a CSV written without MLflow (as on the GPU machine) is logged afterwards; the OOM cell has no metrics
    assert main(["bench", "--from-csv", str(tmp_path / "bench.csv"), "--runs-dir", str(tmp_path / "logged")]) == 0
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'logged' / 'mlflow.db'}")
    run = mlflow.search_runs(experiment_names=["efficiency"]).iloc[0]
    assert run["params.bench.models"] == "['tiny_pha']" and "metrics.tokens_per_s/models/tiny_pha/train/64" in run
    assert "metrics.tokens_per_s/models/tiny_pha/train/32" not in run


def test_failing_cell_is_an_error_row_and_a_nonzero_exit(tmp_path, monkeypatch):
    def broken(*args):
        raise ValueError("boom")

    monkeypatch.setattr(efficiency, "build_step", broken)
    rc, rows = bench(
        tmp_path, "parts=[models]", *TINY, "models=[tiny_gss]", "seq_lens=[32]", "modes=[prefill]", "--no-mlflow"
    )
    assert rc == 1 and rows[0]["status"] == "error" and "boom" in rows[0]["note"]


def test_time_budget_skips_cells_but_writes_them(tmp_path):
    rc, rows = bench(tmp_path, "parts=[models]", *TINY, "max_minutes=0", "--no-mlflow")
    assert rc == 0 and len(rows) == 8 and {r["status"] for r in rows} == {"skipped"}


def test_time_budget_skips_every_planned_cell_of_every_part(tmp_path):
    """The overhead part too: each of its loops x rounds is a skipped row (and Lightning is never started)."""
    rc, rows = bench(tmp_path, "parts=[overhead,models]", *TINY, "overhead.rounds=2", "max_minutes=0", "--no-mlflow")
    assert rc == 0 and {r["status"] for r in rows} == {"skipped"}
    assert [r["mode"] for r in rows if r["part"] == "overhead"] == ["loop_plain", "loop_lightning"] * 2
    assert len(rows) == 4 + 8


def test_time_steps_times_each_step_after_the_warmup():
    calls = []
    times = timing.time_steps(lambda: (calls.append(1), time.sleep(0.002)), 2, 5, torch.device("cpu"))
    assert len(calls) == 7 and len(times) == 5 and min(times) >= 2.0
    p10, p50, p90 = timing.percentiles(times)
    assert min(times) <= p10 <= p50 <= p90 <= max(times)


@pytest.mark.parametrize(
    "name, seq_len",
    [
        ("gpt2_reference", 1024),
        ("pha_125m:gss", 1024),
        ("pha_125m:attn", 2048),
        ("pha_125m:ffn", 1024),
        ("pha_125m", 2048),
        ("gss_125m", 1024),
    ],
)
def test_bench_flops_match_torch_flop_counter(name, seq_len):
    """Train and prefill FLOPs of the bench's workloads (reference, branch stacks, and the presets' forward) vs
    Lightning's `measure_flops` on the meta device; FFTs are not counted by torch, so they are left out."""
    from lightning.fabric.utilities.throughput import measure_flops

    from pha_lab.models.gss import GSS

    wl = make_workload(name, "meta", seq_len)
    batch = wl.batch(1, seq_len, torch.device("meta"), None)
    fft = sum(m.flops_per_token(seq_len) for m in wl.module.modules() if isinstance(m, GSS))
    for training in (True, False):
        measured = (
            measure_flops(
                wl.module,
                lambda training=training: wl.loss(wl.module, batch) if training else wl.forward(wl.module, batch),
                (lambda y: y) if training else None,
            )
            / seq_len
        )
        est = wl.flops_per_token(seq_len, training) - (3 if training else 1) * fft
        assert abs(est / measured - 1) < 0.10, (name, training, est, measured)


def test_floors_count_optimizer_and_scale_with_tokens():
    sizes = make_workload("tiny_pha", "meta").sizes()
    train = roofline.floors(sizes, 1e6, 64, 2, True, 1e12, 1e12)
    prefill = roofline.floors(sizes, 1e6 / 3, 64, 2, False, 1e12, 1e12)
    double = roofline.floors(sizes, 1e6, 64, 4, True, 1e12, 1e12)
    assert train["min_bytes_gb"] > prefill["min_bytes_gb"] and train["mem_floor_gb"] > prefill["mem_floor_gb"]
    assert train["mem_floor_gb"] * 1e9 >= 16 * sizes["n_params"]
    assert double["flops_per_step"] == 2 * train["flops_per_step"]
    assert train["min_bytes_gb"] < double["min_bytes_gb"] < 2 * train["min_bytes_gb"]  # weight traffic is per step


@pytest.mark.parametrize("variant", dss_variants.VARIANTS)
@pytest.mark.parametrize("length, chunk", [(96, 32), (64, 128)])
def test_dss_variants_equal_the_definition_in_float64(variant, length, chunk):
    """Every candidate DSS implementation is the model's function: output against the O(L^2) definition,
    gradients (input and every parameter) against the model's own FFT path."""
    torch.manual_seed(1)
    bench_dss = dss_variants.DSSBench(6, 4, variant, chunk).double()
    model_dss = dss_variants.DSSBench(6, 4, "fft").double()
    with torch.no_grad():  # move off the init so every parameter matters
        for p in bench_dss.parameters():
            p.add_(0.3 * torch.randn_like(p))
    model_dss.load_state_dict(bench_dss.state_dict())
    v = torch.randn(2, length, 6, dtype=torch.float64, requires_grad=True)
    y = bench_dss(v)
    ref = dss_variants.reference(v, bench_dss.dss)
    assert ((y - ref).norm() / ref.norm()).item() < 1e-12
    g = torch.randn_like(y)
    grads = torch.autograd.grad((y * g).sum(), [v, *bench_dss.parameters()])
    want = torch.autograd.grad((model_dss(v) * g).sum(), [v, *model_dss.parameters()])
    for a, b in zip(grads, want):
        assert ((a - b).norm() / b.norm()).item() < 1e-12


def test_gpt2_reference_trains_on_cpu():
    result = gpt2_reference.train("gpt2_tiny", seq_len=32, batch_size=2, steps=3, warmup=1, device="cpu")
    assert result["tokens_per_s"] > 0 and len(result["losses"]) == 4
    assert all(math.isfinite(v) for v in result["losses"])
    assert abs(result["losses"][0] - math.log(2048)) < 1.0  # random init: about uniform over the vocabulary
    model = gpt2_reference.build("gpt2_tiny", 32)
    assert model.lm_head.weight is model.wte.weight


def test_lightning_and_plain_loops_are_both_timed():
    from omegaconf import OmegaConf

    from pha_lab.bench.overhead import measure_loops  # imports lightning: only here

    o = OmegaConf.structured(
        OverheadSpec(model="tiny_pha", seq_len=32, batch_size=2, warmup=1, steps=3, rounds=1, compile=False)
    )
    rows = list(measure_loops(o, torch.device("cpu"), torch.float32))
    assert [c.mode for c, _ in rows] == ["loop_plain", "loop_lightning"]
    for _, result in rows:
        assert result["status"] == "ok", result
        assert result["tokens_per_s"] > 0 and result["step_ms_p10"] <= result["step_ms_median"]


def test_bench_specs_live_in_bench_and_pha_lab_sweep_points_there(capsys):
    from pha_lab.config import BENCH_DIR, PROJECT_ROOT
    from pha_lab.sweep.spec import sweep_names

    assert (BENCH_DIR / "efficiency.yaml").is_file() and not (PROJECT_ROOT / "sweeps" / "efficiency.yaml").exists()
    assert "efficiency" not in sweep_names() and load_spec("efficiency").name == "efficiency"
    assert main(["sweep", "efficiency"]) == 2
    err = capsys.readouterr().err
    assert "'efficiency' is a benchmark spec (bench/efficiency.yaml), not a sweep" in err
    assert "pha-lab bench efficiency" in err


def test_quick_spec_fits_five_minutes_and_plans_the_twins():
    """bench/quick.yaml extends the efficiency grid: its parts, the mini twins at the presets' batch, the compiled
    GSS stack at 8k, and a planned time (compile allowances included) under 5 minutes at the H100 figures."""
    spec = load_spec("quick")
    assert spec.name == "quick" and list(spec.parts) == ["targets", "targets_mini", "overhead_mini", "dss", "branches"]
    cells = plan(spec)
    mini = [c for c in cells if c.part == "targets_mini"]
    assert [(c.model, c.batch_size, c.compile) for c in mini] == [
        ("gpt2_mini", 16, True),
        ("mini_transformer", 16, True),
    ]
    assert [c.mode for c in cells if c.part == "overhead_mini"] == ["loop_plain", "loop_lightning"] * 3
    assert [(c.model, c.seq_len, c.compile) for c in cells if c.part == "branches"] == [("pha_180m:gss", 8192, True)]
    variants = ("fft_autograd", "fft", "chunked-128")
    assert {c.model for c in cells if c.part == "dss"} == {f"pha_180m:dss-{v}" for v in variants}
    text = efficiency.plan_table(spec)
    minutes = float(re.search(r"estimated ([\d.]+) min", text).group(1))
    assert 3.0 < minutes < 5.0, text
    for part in spec.parts:
        assert re.search(rf"\b{part} \d+", text), part  # the per-part seconds
    compiled = [c for c in cells if c.compile and c.part != "overhead_mini"]
    assert text.count("True") >= len(compiled)
    assert (
        efficiency.compile_allowance(make_workload("pha_125m", "meta"))
        > efficiency.compile_allowance(make_workload("gpt2_reference", "meta"))
        > efficiency.PLAN_COMPILE_BASE_S
    )


def test_gpt2_mini_is_mini_transformers_twin():
    twin, mini = make_workload("gpt2_mini", "meta"), make_workload("mini_transformer", "meta")
    c = twin.module.config
    assert (c.n_layer, c.n_embd, c.vocab_size) == (8, 384, 50304) and len(mini.module.blocks) == 8
    assert abs(twin.sizes()["n_params"] / mini.sizes()["n_params"] - 1) < 0.10


def test_tiny_quick_run_writes_the_twin_and_overhead_rows(tmp_path, capsys):
    """`pha-lab bench quick` on CPU: the targets at both scales with their plain twins, the mini Lightning-vs-plain
    loops, every DSS implementation and the GSS stack each write an ok row, and the comparisons are printed."""
    rc, rows = bench(tmp_path, "quick", "--no-mlflow")
    assert rc == 0
    assert [r["part"] for r in rows] == (
        ["targets"] * 3 + ["targets_mini"] * 2 + ["overhead_mini"] * 2 + ["dss"] * 6 + ["branches"] * 2
    )
    assert all(r["status"] == "ok" and r["tokens_per_s"] > 0 for r in rows), rows
    assert [r["model"] for r in rows if r["part"] == "targets_mini"] == ["gpt2_tiny", "tiny_transformer"]
    assert {r["model"] for r in rows if r["part"] == "overhead_mini"} == {"tiny_transformer"}
    printed = capsys.readouterr().out
    assert printed.count("tiny_transformer vs gpt2_tiny") == 2  # one line per scale
    assert "tiny_transformer: Lightning loop vs plain loop" in printed
    assert "tiny_transformer through the Lightning loop vs gpt2_tiny" in printed
    from pha_lab.analysis.efficiency import load_efficiency

    models_part, _ = load_efficiency(tmp_path / "bench.csv", part="dss")  # the CSV stays readable by the analysis
    assert len(models_part) == 6


def test_traffic_counts_bytes_and_the_cufft_extras():
    """The byte counter behind the perf-notes predictions: a cast moves its input and output, views are free, an
    irfft adds the clone of its input and (default norm) a scaling pass; the model's DSS path moves less than the
    one before it at PHA-180M's width."""
    from pha_lab.bench import traffic

    with traffic.Traffic(1e12, 1e12) as t:
        x = torch.empty(1000, device="meta", dtype=torch.bfloat16)
        x.float().t()
        torch.fft.irfft(torch.empty(4, 9, device="meta", dtype=torch.complex64), n=16)
        torch.fft.irfft(torch.empty(4, 9, device="meta", dtype=torch.complex64), n=16, norm="forward")
    assert t.bytes["_to_copy"] == 6000 and "t" not in t.bytes
    spectrum, signal = 4 * 9 * 8, 4 * 16 * 4
    # two calls: each reads its spectrum and writes its signal, and clones its spectrum; one scales its signal
    assert t.bytes["_fft_c2r"] == 2 * (spectrum + signal) + 2 * (2 * spectrum) + 2 * signal
    old, new = (sum(traffic.count_step(f"pha_180m:dss-{v}", 1024, 2).bytes.values()) for v in ("fft_autograd", "fft"))
    assert new < 0.8 * old


# --------------------------------------------------------------------------- decode part
def test_tiny_decode_part_rows_columns_and_cache(tmp_path, capsys):
    """`pha-lab bench decode` on CPU (efficiency.yaml's cpu: section): one ok row per model x context x batch with the
    decode columns; tokens/s per sequence and for the batch; the state's measured bytes equal the analytic cache; a
    window keeps tiny_pha_swa's cache from growing but in its one full-attention layer; MLflow has each batch."""
    rc, rows = bench(tmp_path, "decode")
    assert rc == 0
    d = load_spec("decode", tiny=True).decode
    assert [(r["model"], r["seq_len"], r["batch_size"]) for r in rows] == [
        (m, t, b) for m in d.models for t in d.contexts for b in d.batch_sizes
    ]
    decoded = d.warmup + d.steps
    for r in rows:
        assert (r["part"], r["mode"], r["status"]) == ("decode", "decode", "ok"), r
        assert r["cache_bytes_measured"] == r["cache_bytes_analytic"] > 0
        assert r["cache_gb"] == pytest.approx(r["cache_bytes_analytic"] / 1e9)
        assert r["decode_tok_s_per_seq"] == pytest.approx(1e3 / r["step_ms_median"], rel=1e-3)
        assert r["decode_tok_s"] == pytest.approx(r["batch_size"] * r["decode_tok_s_per_seq"], rel=1e-3)
        assert r["tokens_per_s"] == pytest.approx(r["decode_tok_s"], rel=1e-3)
        assert r["prefill_tok_s"] == pytest.approx(
            r["batch_size"] * (r["seq_len"] - decoded) / (r["prefill_ms"] / 1e3), rel=1e-3
        )
        assert r["flops_per_step"] > 0 and r["min_bytes_gb"] * 1e9 > r["cache_bytes_analytic"]
    cache = {(r["model"], r["seq_len"], r["batch_size"]): r["cache_bytes_measured"] for r in rows}
    kv_per_position = 2 * 2 * 16 * 4  # K and V, 2 KV heads x 16, fp32: per layer that keeps the position
    for b in d.batch_sizes:  # 72 - 40 more positions: the transformer's 2 layers keep them, tiny_pha_swa only layer 1
        assert cache["tiny_transformer", 72, b] - cache["tiny_transformer", 40, b] == 2 * 32 * kv_per_position * b
        assert cache["tiny_pha_swa", 72, b] - cache["tiny_pha_swa", 40, b] == 32 * kv_per_position * b
        assert cache["tiny_gss", 72, b] == cache["tiny_gss", 40, b]
    printed = capsys.readouterr().out
    assert "decode tok/s" in printed and "measured cache = analytic in every cell" in printed
    assert "tiny_pha_swa / tiny_transformer (decode, B=2, by context): T=40:" in printed

    from pha_lab.analysis.efficiency import decode_table, load_decode

    frame, _ = load_decode(tmp_path / "bench.csv")  # the analysis reads the CSV back: one row per cell, the note
    table = decode_table(frame)
    assert len(table.frame) == len(rows) and "equal to the analytic count in every row" in table.notes[0]
    assert "| tiny_pha_swa |" in table.to_markdown()

    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    run = mlflow.search_runs(experiment_names=["decode"]).iloc[0]
    for b in d.batch_sizes:
        assert run[f"metrics.decode_tok_s/decode/tiny_pha_swa/decode_b{b}/72"] == pytest.approx(
            next(
                r["decode_tok_s"]
                for r in rows
                if (r["model"], r["seq_len"], r["batch_size"]) == ("tiny_pha_swa", 72, b)
            ),
            rel=1e-4,
        )


def test_decode_cells_over_the_cache_limit_or_out_of_memory_are_rows(tmp_path, monkeypatch):
    """A cell whose cache + weights exceed decode.max_cache_gb is skipped with the sizes in its note; an OOM while
    decoding is an OOM row; the other cells run."""
    from pha_lab.models.lm import LanguageModel
    from pha_lab.models.memory import weight_bytes

    model = make_workload("tiny_pha", "meta").module
    limit = (weight_bytes(model) + model.cache_bytes(2, 40, 4) + 1) / 1e9  # fits B=2 at 40 and B=1 at 72, not B=2 at 72
    real = LanguageModel.step

    def step(self, ids, state):
        if state.max_len == 40 and state.batch == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")
        return real(self, ids, state)

    monkeypatch.setattr(LanguageModel, "step", step)
    rc, rows = bench(tmp_path, "decode", "decode.models=[tiny_pha]", f"decode.max_cache_gb={limit}", "--no-mlflow")
    assert rc == 0
    status = {(r["seq_len"], r["batch_size"]): r for r in rows}
    assert status[40, 1]["status"] == "OOM" and "out of memory" in status[40, 1]["note"]
    assert status[40, 2]["status"] == status[72, 1]["status"] == "ok"
    assert status[72, 2]["status"] == "skipped" and re.search(r"= [\d.e-]+ GB > [\d.e-]+ GB", status[72, 2]["note"])
    assert "decode.max_cache_gb" in status[72, 2]["note"] and status[72, 2]["cache_bytes_analytic"] > 0
    assert math.isnan(status[72, 2]["decode_tok_s"]) and status[72, 2]["min_bytes_gb"] > 0  # its floors still computed


def test_decode_spec_plans_the_issue_grid_within_its_budget():
    """bench/decode.yaml: 5 presets x {1k..32k} x {1, 16}, each row with its step and prefill floors, and a planned
    time within max_minutes at the spec's figures; a context shorter than the decoded tokens is refused."""
    spec = load_spec("decode")
    cells = plan(spec)
    assert list(spec.parts) == ["decode"] and len(cells) == 50 and {c.mode for c in cells} == {"decode"}
    assert {c.model for c in cells} == {"transformer_180m", "pha_180m", "pha_sparse_180m", "pha_swa_180m", "gss_125m"}
    assert sorted({c.seq_len for c in cells}) == [1024, 4096, 8192, 16384, 32768]
    assert {c.batch_size for c in cells} == {1, 16}
    text = efficiency.plan_table(spec)
    minutes = float(re.search(r"estimated ([\d.]+) min", text).group(1))
    assert 0.5 < minutes < spec.max_minutes and re.search(r"by part: decode \d+", text)
    assert "prefill floor ms" in text
    # at 32k, B=16 a step of the transformer moves its whole KV cache; the sliding-window PHA's 2 full layers much less
    meta = {m: make_workload(m, "meta") for m in ("transformer_180m", "pha_swa_180m")}
    floors = {m: roofline.decode_floors(w, 32768, 16, 32768 - 40, 2, 778e12, 4.8e12) for m, w in meta.items()}
    assert floors["transformer_180m"]["floor_bound"] == "memory"
    assert floors["pha_swa_180m"]["min_bytes_gb"] < 0.3 * floors["transformer_180m"]["min_bytes_gb"]
    with pytest.raises(Exception, match=r"decode.contexts=\[30\] must each exceed decode.warmup \+ decode.steps = 40"):
        load_spec("decode", ["decode.contexts=[30]"])


def test_profile_prints_a_kernel_class_table_per_workload():
    from pha_lab.bench.profile import kernel_class, profile_workload

    assert kernel_class("sm90_xmma_gemm_bf16bf16_bf16f32") == "matmul"
    assert kernel_class("flash_fwd_kernel") == "attention"
    assert kernel_class("triton_poi_fused_add_mul_0") == "triton (fused)"
    text = profile_workload("tiny_transformer", 32, 1, False, 1, torch.device("cpu"), 3)
    assert text.startswith("## tiny_transformer  T=32 B=1")
    assert "matmul" in text and "ms/step" in text and "top 3 kernels" in text
