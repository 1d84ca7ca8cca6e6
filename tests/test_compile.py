"""torch.compile of the whole LanguageModel: no graph breaks in any family (dynamo's explain, cheap), compiled
and eager outputs agree (inductor on the CPU: ~10-60 s per model, so one small case runs by default and every
family is marked slow), and what `trainer.compile` / `compile_mode` mean."""

from __future__ import annotations

import pytest
import torch
from bodies import TINY

from pha_lab.config import MIXERS, ConfigError, load_config
from pha_lab.models import build_model
from pha_lab.training import loss
from pha_lab.training.device import compile_enabled


def model_and_ids(experiment: str, *overrides: str, batch: int = 2, seq_len: int = 32):
    cfg = load_config(experiment, list(overrides))
    torch.manual_seed(0)
    return build_model(cfg.model), torch.randint(0, cfg.model.vocab_size, (batch, seq_len)), cfg


def graph_breaks(fn, *args, **kwargs) -> tuple[int, list[str]]:
    torch._dynamo.reset()
    explained = torch._dynamo.explain(fn)(*args, **kwargs)
    return explained.graph_count, [str(b.reason).splitlines()[0] for b in explained.break_reasons]


@pytest.mark.parametrize(
    "overrides",
    [(f, ()) for f in TINY]
    + [("tiny_pha", (f"model.mixer={m}",)) for m in MIXERS if m != "static"]
    + [("tiny_pha", ("model.gss.kernel=s4d_lin_noscale",))],
    ids=lambda o: "-".join([o[0], *o[1]]).replace("model.", ""),
)
def test_the_whole_model_is_one_graph(overrides):
    """Training calls model(idx, return_hidden=True) (the loss owns the head), evaluation and generation
    model(idx): each is one graph, in fp32 and under bf16 autocast (where GSS switches autocast off around its FFT)."""
    experiment, extra = overrides
    model, idx, _ = model_and_ids(experiment, *extra)
    for amp in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            for kwargs in ({"return_hidden": True}, {}):
                assert graph_breaks(model, idx, **kwargs) == (1, []), (amp, kwargs)


def test_the_loss_chunk_kernels_are_one_graph_each():
    logits, labels = torch.randn(64, 512, dtype=torch.bfloat16), torch.randint(0, 512, (64,))
    labels[::5] = -100
    assert graph_breaks(loss._nll_and_grad_pointwise, logits, labels) == (1, [])
    assert graph_breaks(loss._nll_only, logits, labels) == (1, [])


def _compiled_matches_eager(experiment: str, *overrides: str) -> None:
    model, idx, _ = model_and_ids(experiment, *overrides)
    model.eval()
    torch._dynamo.reset()
    compiled = torch.compile(model)
    with torch.no_grad():
        for kwargs in ({"return_hidden": True}, {}):
            eager, fast = model(idx, **kwargs), compiled(idx, **kwargs)
            assert fast.shape == eager.shape
            assert torch.allclose(fast, eager, rtol=1e-4, atol=1e-5), (kwargs, (fast - eager).abs().max().item())


def test_compiled_and_eager_agree_one_layer_pha():
    """The fast case (~10-20 s cold on these cores): one PHA layer, all three branches, GSS's FFT included."""
    _compiled_matches_eager("tiny_pha", "model.n_layers=1")


@pytest.mark.slow
@pytest.mark.parametrize("experiment", TINY)
def test_compiled_and_eager_agree_every_family(experiment):
    _compiled_matches_eager(experiment)


@pytest.mark.slow
def test_compiled_training_step_matches_eager():
    """LMModule with trainer.compile=true (the model and the loss's chunk kernels compiled): the training loss
    and every parameter's gradient equal the eager module's."""
    from pha_lab.training.module import LMModule

    grads = {}
    for compiled in (False, True):
        torch._dynamo.reset()
        cfg = load_config("tiny_pha", [f"trainer.compile={str(compiled).lower()}", "trainer.loss_chunk_tokens=100"])
        torch.manual_seed(0)
        module = LMModule(cfg)
        assert module.compiled is compiled
        ids = torch.randint(
            0, cfg.model.vocab_size, (2, cfg.data.seq_len + 1), generator=torch.Generator().manual_seed(1)
        )
        _, nll, count = module._losses({"input_ids": ids[:, :-1], "labels": ids[:, 1:]})
        (nll / count).backward()
        grads[compiled] = {"loss": nll.detach(), **{n: p.grad for n, p in module.model.named_parameters()}}
    for name, eager in grads[False].items():
        assert torch.allclose(grads[True][name], eager, rtol=1e-4, atol=1e-6), name


def test_compile_setting():
    """auto: on for a GPU run, off on the CPU and under trainer.deterministic; true/false force it; bad values
    fail naming the key."""
    assert compile_enabled(load_config("tiny_pha")) is torch.cuda.is_available()
    assert compile_enabled(load_config("tiny_pha", ["trainer.accelerator=gpu"])) is True
    assert compile_enabled(load_config("tiny_pha", ["trainer.accelerator=gpu", "trainer.deterministic=true"])) is False
    assert compile_enabled(load_config("tiny_pha", ["trainer.accelerator=cpu", "trainer.compile=true"])) is True
    assert compile_enabled(load_config("tiny_pha", ["trainer.accelerator=gpu", "trainer.compile=false"])) is False
    with pytest.raises(ConfigError, match="trainer.compile; choose one of: true, false, auto"):
        load_config("tiny_pha", ["trainer.compile=sometimes"])
    with pytest.raises(ConfigError, match="trainer.compile_mode .*did you mean 'max-autotune'"):
        load_config("tiny_pha", ["trainer.compile_mode=max_autotune"])
