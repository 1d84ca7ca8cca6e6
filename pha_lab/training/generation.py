"""`pha-lab generate RUN_ID | CKPT --prompt TEXT --max-new-tokens N`: text sampled from a trained model.

The run's config and checkpoint are found and loaded as `pha-lab eval` does (evaluate.locate and load_module), the
prompt is encoded with the run's own tokenizer (its data.* section: the same BPE it was trained on), and the
continuation is sampled by LanguageModel.generate (pha_lab.models.decoding: a parallel prefill of the prompt, then
one step per token from the KV cache and recurrent states; temperature 0 is greedy). An empty prompt starts from
<|endoftext|>, the token before every document of the training stream; generation stops at the next <|endoftext|>
(the end of a document) or after N tokens. The model runs in its checkpoint's fp32 on the chosen device.
"""

from __future__ import annotations

from pha_lab.config import ConfigError
from pha_lab.training.evaluate import load_module, locate


def generate_text(
    target: str,
    prompt: str,
    max_new_tokens: int,
    overrides: list[str] = (),
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = 0,
    device: str | None = None,
    which: str = "last",
) -> str:
    """The prompt followed by its sampled continuation, as text (see the module docstring)."""
    import torch

    from pha_lab.data.tokenizer import build_tokenizer
    from pha_lab.models.decoding import check_sampling

    try:
        check_sampling(max_new_tokens, temperature, top_k, top_p)
    except ValueError as exc:
        raise ConfigError(f"pha-lab generate: {exc}") from None
    ckpt, cfg, _ = locate(target, list(overrides), which)
    if cfg.data.source == "mqar":
        raise ConfigError(
            f"{target} is an MQAR run (data.source=mqar): its tokens are synthetic ids, there is no text to generate"
        )
    tok = build_tokenizer(cfg.data)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = load_module(ckpt, cfg).model.to(dev).eval()
    prompt_ids = tok.encode(prompt)
    ids = prompt_ids or [tok.eot_id]
    out = model.generate(
        torch.tensor([ids], device=dev),
        max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        eos_id=tok.eot_id,
    )
    new = out[0, len(ids) :].tolist()
    if new and new[-1] == tok.eot_id:
        new.pop()
    return tok.decode(prompt_ids + new)
