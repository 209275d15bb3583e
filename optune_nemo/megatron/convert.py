"""Convert between Hugging Face models and megatron distributed checkpoints.

    python -m optune_nemo.convert hf-to-mcore --hf DIR --out DIR [--tp N] [--pp N] [--seq-length N]
    python -m optune_nemo.convert hf-to-mcore --gguf FILE --out DIR [--tp N]
    python -m optune_nemo.convert mcore-to-hf --ckpt DIR --out DIR [--base DIR] [--max-shard-gb G]

hf-to-mcore writes (the `model/` part is what `MegatronPolicy.save_checkpoint` writes for the model,
so `policy.load_checkpoint(out/model, load_optimizer=False)` starts a run from it, at any TP/PP):

    model/                  megatron dist checkpoint {"model": GPTModel.sharded_state_dict()}
    model_config.yaml       the `model:` section of the run config (ModelConfig)
    hf/                     the source config.json and generation_config.json (for the way back)
    tokenizer/              HFTokenizer files (`HFTokenizer.from_pretrained(out/tokenizer)`)
    convert_meta.json       architecture, unpadded vocabulary size, source, TP/PP used

With --tp/--pp > 1 and no launcher, the command starts tp*pp local gloo/nccl ranks itself (or run it
under torchrun with that many processes); each rank reads only its own slices of the HF weights.

mcore-to-hf reads such a directory, or a training checkpoint (`exp_dir/checkpoints/iter_N`, whose
`model/` holds the weights) with `--base` naming the hf-to-mcore directory it started from.

Every input is checked before anything is written; output goes to a temporary sibling of --out that
is renamed at the end, so a failure leaves nothing behind. Exit code 2 for bad input.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

log = logging.getLogger("optune_nemo.convert")

META = "convert_meta.json"
FORMAT_VERSION = 1


# --------------------------------------------------------------------------- hf-to-mcore


def _resolve_source(args) -> tuple[Path, Path | None]:
    """(HF directory, temporary directory to delete) for --hf or --gguf."""
    from optune_nemo.megatron.hf_import import gguf_to_hf_dir

    if bool(args.hf) == bool(args.gguf):
        raise ValueError("hf-to-mcore: give exactly one of --hf DIR or --gguf FILE")
    if args.hf:
        return Path(args.hf), None
    if not Path(args.gguf).is_file():
        raise ValueError(f"--gguf: {args.gguf} is not a file")
    scratch = Path(tempfile.mkdtemp(prefix="optune-gguf-"))
    return gguf_to_hf_dir(args.gguf, scratch / "hf"), scratch


def _validate_hf(hf_dir: Path, args):
    """Everything that can be checked without building the model; returns the ModelConfig."""
    from optune_nemo.megatron.hf_import import SafetensorsReader, check_parallel_sizes, hf_config_to_model_config

    model_cfg = hf_config_to_model_config(hf_dir, seq_length=args.seq_length)
    check_parallel_sizes(model_cfg, tp_size=args.tp, pp_size=args.pp)
    SafetensorsReader(hf_dir)
    _check_out(args.out)
    return model_cfg


def _check_out(out: str) -> None:
    path = Path(out)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ValueError(f"--out: {out} exists and is not empty; choose a new directory")


def _write_metadata(tmp: Path, hf_dir: Path, model_cfg, args, source: str) -> None:
    from omegaconf import OmegaConf

    from optune_nemo.data.hf_tokenizer import HFTokenizer
    from optune_nemo.megatron.hf_import import read_hf_config

    info = read_hf_config(hf_dir)
    (tmp / "model_config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(asdict(model_cfg))))
    (tmp / "hf").mkdir(exist_ok=True)
    for name in ("config.json", "generation_config.json"):
        if (hf_dir / name).is_file():
            shutil.copy(hf_dir / name, tmp / "hf" / name)
    if (hf_dir / "tokenizer_config.json").is_file() or (hf_dir / "tokenizer.json").is_file():
        HFTokenizer.from_pretrained(hf_dir).save(tmp / "tokenizer")
    else:
        log.warning("%s has no tokenizer files: the converted model has none either", hf_dir)
    meta = {"format_version": FORMAT_VERSION, "architecture": info.architecture,
            "vocab_size": info.vocab_size, "source": source, "tensor_model_parallel_size": args.tp,
            "pipeline_model_parallel_size": args.pp}
    (tmp / META).write_text(json.dumps(meta, indent=2) + "\n")


def _load_and_save(hf_dir: Path, model_cfg, tmp: Path, args) -> None:
    """On every rank: build this rank's chunk, fill it from the HF weights, save the dist checkpoint.
    A load error on any rank is agreed on by all ranks before saving (no rank hangs in a collective)."""
    import torch.distributed as tdist
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    from optune_nemo.megatron.cpu_compat import model_parallel_seed
    from optune_nemo.megatron.hf_import import load_hf_weights_into, read_hf_config
    from optune_nemo.megatron.model import build_gpt_model
    from optune_nemo.megatron.parallel import init_distributed
    from optune_nemo.runtime.distributed import all_gather_object

    d = init_distributed(args.tp, args.pp)
    if d.world_size != args.tp * args.pp:
        raise ValueError(f"--tp * --pp = {args.tp * args.pp} must equal the number of processes "
                         f"{d.world_size} (data parallelism has no use here)")
    model_parallel_seed(0)
    model = build_gpt_model(model_cfg, vocab_size=read_hf_config(hf_dir).vocab_size, tp_size=d.tp_size,
                            pp_size=d.pp_size, pre_process=ps.is_pipeline_first_stage(),
                            post_process=ps.is_pipeline_last_stage())
    error = None
    try:
        load_hf_weights_into(model, hf_dir, model_cfg=model_cfg, tp_rank=d.tp_rank, tp_size=d.tp_size,
                             pp_rank=d.pp_rank, pp_size=d.pp_size)
    except ValueError as e:
        error = str(e)
    errors = [e for e in all_gather_object(error) if e]
    if errors:
        raise ValueError(errors[0])
    (tmp / "model").mkdir(parents=True, exist_ok=True)
    tdist.barrier()
    dist_checkpointing.save({"model": model.sharded_state_dict()}, str(tmp / "model"))
    tdist.barrier()


def hf_to_mcore(args) -> Path | None:
    """The hf-to-mcore command in this process (one rank of a launched job, or the whole job)."""
    hf_dir, scratch = _resolve_source(args)
    try:
        model_cfg = _validate_hf(hf_dir, args)
        if args.tp * args.pp > 1 and "RANK" not in os.environ:
            return _spawn_ranks(args, hf_dir, model_cfg)
        tmp = Path(args._tmp) if args._tmp else _tmp_sibling(args.out)
        rank = int(os.environ.get("RANK", "0"))
        try:
            _load_and_save(hf_dir, model_cfg, tmp, args)
            if rank == 0:
                _write_metadata(tmp, hf_dir, model_cfg, args, source=str(args.hf or args.gguf))
        except BaseException:
            if rank == 0 and not args._tmp:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        if args._tmp or rank != 0:
            return None   # the launching process renames
        os.replace(tmp, args.out)
        return Path(args.out)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


def _tmp_sibling(out: str) -> Path:
    out_path = Path(out)
    tmp = out_path.parent / f".{out_path.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if out_path.is_dir():   # empty (checked): os.replace needs it gone
        out_path.rmdir()
    return tmp


def _spawn_ranks(args, hf_dir: Path, model_cfg) -> Path:
    """Run this command on tp*pp local ranks into one temporary directory, rename it on success."""
    from optune_nemo.runtime.distributed import _free_port

    n, tmp = args.tp * args.pp, _tmp_sibling(args.out)
    argv = [sys.executable, "-m", "optune_nemo.convert", "hf-to-mcore", "--hf", str(hf_dir), "--out",
            args.out, "--tp", str(args.tp), "--pp", str(args.pp), "--_tmp", str(tmp)]
    if args.seq_length:
        argv += ["--seq-length", str(args.seq_length)]
    port = str(_free_port())
    procs = [subprocess.Popen(argv, env={**os.environ, "RANK": str(r), "WORLD_SIZE": str(n),
                                         "LOCAL_RANK": str(r), "MASTER_ADDR": "127.0.0.1",
                                         "MASTER_PORT": port, "OMP_NUM_THREADS": "1"})
             for r in range(n)]
    codes = [p.wait() for p in procs]
    if any(codes):
        shutil.rmtree(tmp, ignore_errors=True)
        if 2 in codes:
            raise ValueError(f"a rank refused the input (its error is above); nothing written to {args.out}")
        raise RuntimeError(f"hf-to-mcore: ranks exited with {codes}; nothing written to {args.out}")
    os.replace(tmp, args.out)
    return Path(args.out)


# --------------------------------------------------------------------------- mcore-to-hf


def _meta_dirs(args) -> tuple[Path, Path]:
    """(weights directory, metadata directory) for --ckpt / --base."""
    ckpt = Path(args.ckpt)
    if not ckpt.is_dir():
        raise ValueError(f"--ckpt: {ckpt} is not a directory")
    weights = ckpt / "model" if (ckpt / "model").is_dir() else ckpt
    if not (weights / "metadata.json").is_file():
        raise ValueError(f"--ckpt: no megatron dist checkpoint in {ckpt} or {ckpt / 'model'} "
                         "(expected metadata.json)")
    base = Path(args.base) if args.base else ckpt
    for name in (META, "model_config.yaml"):
        if not (base / name).is_file():
            raise ValueError(f"--base: {base} has no {name}; pass --base with the hf-to-mcore output "
                             "directory the checkpoint comes from")
    return weights, base


def load_model_config(path: Path):
    from omegaconf import OmegaConf

    from optune_nemo.config import ModelConfig

    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig),
                                                   OmegaConf.load(path)))
    except Exception as e:   # omegaconf raises several types for unknown keys / bad values
        raise ValueError(f"{path}: not a valid model config: {e}") from None


def _expected_vs_checkpoint(model, weights: Path) -> list[str]:
    """Mismatches between the model's sharded tensors and the checkpoint's, as messages."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    stored = dist_checkpointing.load_tensors_metadata(str(weights))
    problems, seen = [], set()
    # ShardedTensorFactory entries (megatron's gated linear_fc1) carry no global shape; a wrong
    # ffn_hidden_size still shows in linear_fc2
    for sh in model.sharded_state_dict().values():
        if not isinstance(sh, ShardedTensor) or sh.key in seen:
            continue
        seen.add(sh.key)
        if sh.key not in stored:
            problems.append(f"{sh.key}: missing from the checkpoint")
        elif tuple(stored[sh.key].global_shape) != tuple(sh.global_shape):
            problems.append(f"{sh.key}: checkpoint shape {list(stored[sh.key].global_shape)}, "
                            f"model config implies {list(sh.global_shape)}")
    return problems


def _checkpoint_vocab_rows(weights: Path) -> int | None:
    from megatron.core import dist_checkpointing

    stored = dist_checkpointing.load_tensors_metadata(str(weights))
    key = "embedding.word_embeddings.weight"
    return int(stored[key].global_shape[0]) if key in stored else None


def mcore_to_hf(args) -> Path:
    import torch
    from megatron.core import dist_checkpointing

    from optune_nemo.data.hf_tokenizer import HFTokenizer
    from optune_nemo.megatron.cpu_compat import model_parallel_seed
    from optune_nemo.megatron.hf_export import export_hf
    from optune_nemo.megatron.model import build_gpt_model
    from optune_nemo.megatron.parallel import init_distributed

    weights, base = _meta_dirs(args)
    _check_out(args.out)
    meta = json.loads((base / META).read_text())
    model_cfg = load_model_config(base / "model_config.yaml")
    d = init_distributed(1, 1)
    model_parallel_seed(0)
    # build with the checkpoint's padded rows: padding depends on the TP size it was written with
    rows = _checkpoint_vocab_rows(weights) or meta["vocab_size"]
    model = build_gpt_model(model_cfg, vocab_size=max(rows, meta["vocab_size"]))
    problems = _expected_vs_checkpoint(model, weights)
    if problems:
        raise ValueError(f"--ckpt: {weights} does not match {base / 'model_config.yaml'}: "
                         + "; ".join(problems[:5]))
    with torch.no_grad():
        state = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(weights))
        model.load_state_dict(state["model"])
    tokenizer = HFTokenizer.from_pretrained(base / "tokenizer") if (base / "tokenizer").is_dir() else None
    hf_cfg = _read_json(base / "hf" / "config.json")
    gen_cfg = _read_json(base / "hf" / "generation_config.json") or None
    return export_hf([model], model_cfg, args.out, tokenizer=tokenizer, architecture=meta["architecture"],
                     dist=d, vocab_size=meta["vocab_size"], hf_config=hf_cfg, generation_config=gen_cfg,
                     max_shard_bytes=int(args.max_shard_gb * 2**30))


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


# --------------------------------------------------------------------------- entry point


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m optune_nemo.convert", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("hf-to-mcore", help="HF directory or GGUF file -> megatron dist checkpoint")
    a.add_argument("--hf", help="HF model directory (config.json + safetensors)")
    a.add_argument("--gguf", help="a .gguf file (dequantised to float32 through transformers)")
    a.add_argument("--out", required=True, help="new output directory")
    a.add_argument("--tp", type=int, default=1, help="tensor-parallel size to shard with")
    a.add_argument("--pp", type=int, default=1, help="pipeline-parallel size to shard with")
    a.add_argument("--seq-length", type=int, default=None,
                   help="model.seq_length (default: max_position_embeddings, capped at a sliding window)")
    a.add_argument("--_tmp", default=None, help=argparse.SUPPRESS)
    b = sub.add_parser("mcore-to-hf", help="megatron dist checkpoint -> HF directory")
    b.add_argument("--ckpt", required=True, help="hf-to-mcore output or a training checkpoint iter_N")
    b.add_argument("--base", default=None, help="hf-to-mcore output giving config, tokenizer, architecture")
    b.add_argument("--out", required=True, help="new output directory")
    b.add_argument("--max-shard-gb", type=float, default=5.0, help="largest safetensors file")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        out = hf_to_mcore(args) if args.command == "hf-to-mcore" else mcore_to_hf(args)
    except ValueError as e:
        print(f"optune_nemo.convert: error: {e}", file=sys.stderr)
        return 2
    if out is not None:
        log.info("wrote %s", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
