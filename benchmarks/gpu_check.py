"""The GPU path in one run: bf16 training of GPT-2 124M and BERT-base through Kiln's
LightningModules, DDP over NCCL, and DeepSpeed ZeRO-2, each timed on one GPU. Sized to finish well
within 8 minutes on one H200 (25 steps per part); not yet run on one.

    python benchmarks/gpu_check.py --out runs/gpu-check                      # on a CUDA machine
    python benchmarks/gpu_check.py --out runs/gpu-smoke --device cpu --tiny  # CPU, in seconds

Parts (each a Lightning Trainer on one device, synthetic token ids, gradient clipping 1.0):
  gpt2-124m  GPTPretrainModule, preset "base" (12 x 768, vocabulary 50257), batch 32 x 1024
  bert-base  BertPretrainModule, preset "base" (12 x 768, vocabulary 30522), batch 64 x 512,
             15% of positions masked
  ddp        GPT-2 124M under Lightning's DDPStrategy in a 1-process group: NCCL on a GPU (gloo
             on CPU)
  zero2      GPT-2 124M under DeepSpeed ZeRO-2 with Kiln's ZeRO config (cluster/strategies.py
             `_deepspeed`); only when `deepspeed` imports, else recorded as skipped with the pip
             line that adds it
Each records tokens/s over the timed steps (after warm-up; the GPU synchronised at both ends), MFU
(model FLOPs from pretrain/flops.py through the module's own `flops_per_token`, over the device's
peak: the bf16 table entry for a known GPU, else a measured matmul) and peak memory
(torch.cuda.max_memory_allocated: weights, optimizer state and activations). Results go to
<out>/gpu_check.json and <out>/gpu_check.md, with the device, torch / CUDA versions and the date.

It imports only Kiln's Ray-free pieces (pretrain.module, pretrain.flops, the models): the GPU
machine this project may borrow has torch, lightning and transformers but no Ray, DeepSpeed or W&B.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import platform
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runs from a bare checkout, without `pip install -e .`

import lightning as L  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402

from data_pipeline.configlib import from_preset  # noqa: E402
from pretrain.flops import peak_flops  # noqa: E402
from pretrain.models.bert import BertConfig  # noqa: E402
from pretrain.models.gpt import GPTConfig  # noqa: E402
from pretrain.module import BertPretrainModule, GPTPretrainModule, KilnModule  # noqa: E402
from pretrain.optim import OptimConfig  # noqa: E402

PARTS = ("gpt2-124m", "bert-base", "ddp", "zero2")
MASK_PROB = 0.15
DEEPSPEED_PIP = 'pip install --no-build-isolation "deepspeed>=0.16"'  # as the Makefile does
MFU_GOAL_GPT = 0.5  # issue 17 (MPT-125M reaches 42-45% on A100; llm.c about 60%)


@dataclass(frozen=True)
class Shape:
    preset: str
    vocab: int
    batch: int
    seq_len: int


FULL = {"gpt": Shape("base", 50257, 32, 1024), "bert": Shape("base", 30522, 64, 512)}
TINY = {"gpt": Shape("tiny", 64, 2, 32), "bert": Shape("tiny", 64, 2, 32)}


def kiln_zero_config(stage: int, micro_batch: int) -> dict[str, Any]:
    """Kiln's DeepSpeed config (cluster/strategies.py `_deepspeed`, without offload), copied
    because that module imports Ray; tests/benchmarks/test_gpu_check.py keeps the two equal."""
    return {
        "zero_optimization": {"stage": stage},
        "train_micro_batch_size_per_gpu": micro_batch,
        "zero_allow_untested_optimizer": True,
    }


def synthetic_batch(family: str, shape: Shape, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random ids in the batch format of Kiln's collators (docs/design.md), on the CPU."""
    gen = torch.Generator().manual_seed(seed)
    b, t = shape.batch, shape.seq_len
    ids = torch.randint(5, shape.vocab, (b, t), generator=gen)
    if family == "gpt":
        return {"input_ids": ids, "labels": torch.roll(ids, -1, dims=1)}
    chosen = torch.rand(b, t, generator=gen) < MASK_PROB
    chosen[:, 1] = True  # at least one masked position per row
    types = (torch.arange(t) >= t // 2).long().expand(b, t).contiguous()
    return {
        "input_ids": ids,
        "token_type_ids": types,
        "attention_mask": torch.ones(b, t, dtype=torch.long),
        "mlm_labels": torch.where(chosen, ids, -100),
        "next_sentence_label": torch.randint(0, 2, (b,), generator=gen),
    }


def build_module(family: str, shape: Shape, total_steps: int) -> KilnModule:
    optim = OptimConfig(lr=1e-4, warmup_steps=0)
    if family == "gpt":
        cfg = from_preset(GPTConfig, shape.preset, vocab_size=shape.vocab)
        return GPTPretrainModule(cfg, optim, total_steps)
    bert = from_preset(BertConfig, shape.preset, vocab_size=shape.vocab)
    return BertPretrainModule(bert, optim, total_steps)


class StepTimer(Callback):
    """Wall time of the steps after `warmup`, the device synchronised at both ends; the
    torch.distributed backend it ran on."""

    def __init__(self, warmup: int, device: torch.device) -> None:
        self.warmup, self.device = warmup, device
        self.start: float | None = None
        self.seconds = 0.0
        self.timed_steps = 0
        self.backend: str | None = None

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        dist = torch.distributed
        initialised = dist.is_available() and dist.is_initialized()
        self.backend = dist.get_backend() if initialised else None

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if batch_idx == self.warmup:
            self._sync()
            self.start = time.perf_counter()

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if self.start is not None:
            self._sync()
            self.seconds = time.perf_counter() - self.start
            self.timed_steps = batch_idx + 1 - self.warmup


def _strategy(kind: str, device: torch.device, micro_batch: int) -> Any:
    from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, SingleDeviceStrategy

    if kind == "single":
        return SingleDeviceStrategy(device=device)
    if kind == "ddp":
        return DDPStrategy(process_group_backend="nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":  # Lightning's DeepSpeed path: Kiln's strategy defers to it on a GPU
        return DeepSpeedStrategy(config=kiln_zero_config(2, micro_batch))
    # Lightning refuses DeepSpeed on CPU; Kiln's strategy lifts that (it imports Ray, which the CPU
    # development machine has).
    from cluster.strategies import CPUCapableDeepSpeedStrategy

    return CPUCapableDeepSpeedStrategy(config=kiln_zero_config(2, micro_batch))


def deepspeed_missing() -> str | None:
    """None when `deepspeed` imports; otherwise why not."""
    try:
        importlib.import_module("deepspeed")
    except Exception as err:  # ImportError, or a broken build failing on import
        return f"{type(err).__name__}: {err}"
    return None


def run_part(part: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    family = "bert" if part == "bert-base" else "gpt"
    shape = (TINY if args.tiny else FULL)[family]
    record: dict[str, Any] = {
        "part": part,
        "model": f"{family} {shape.preset}",
        "batch": shape.batch,
        "seq_len": shape.seq_len,
        "precision": args.precision,
    }
    if part == "zero2":
        why = deepspeed_missing()
        if why is not None:
            print(
                f"[gpu_check] zero2 skipped: deepspeed not installed ({why}); "
                f"to add it: {DEEPSPEED_PIP}",
                flush=True,
            )
            return {
                **record,
                "status": "skipped: deepspeed not installed",
                "install": DEEPSPEED_PIP,
            }
    kind = {"ddp": "ddp", "zero2": "zero2"}.get(part, "single")
    try:
        return {**record, **_train(family, shape, kind, args, device), "status": "ok"}
    except Exception as err:  # one part failing must not lose the others' figures
        traceback.print_exc()
        return {**record, "status": f"failed: {type(err).__name__}: {err}"}
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()  # the next part starts from a clean slate


def _train(
    family: str, shape: Shape, kind: str, args: argparse.Namespace, device: torch.device
) -> dict[str, Any]:
    steps = args.warmup + args.steps
    torch.manual_seed(0)
    module = build_module(family, shape, steps)
    batch = synthetic_batch(family, shape)
    tokens, per_token = module.count_tokens(batch), module.flops_per_token(batch)
    timer = StepTimer(args.warmup, device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    trainer = L.Trainer(
        accelerator=device.type,
        devices=1,
        strategy=_strategy(kind, device, shape.batch),
        precision=args.precision,
        max_steps=steps,
        gradient_clip_val=1.0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[timer],
    )
    trainer.fit(module, torch.utils.data.DataLoader([batch] * steps, batch_size=None))
    if timer.timed_steps < 1:
        raise RuntimeError(f"no timed steps (ran {trainer.global_step})")
    rate = tokens * timer.timed_steps / timer.seconds
    peak, source = peak_flops(None, device, args.precision)
    params = sum(p.numel() for p in module.model.parameters())
    cuda = device.type == "cuda"
    memory = round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if cuda else None
    return {
        "strategy": kind,
        "backend": timer.backend,
        "params_m": round(params / 1e6, 2),
        "timed_steps": timer.timed_steps,
        "seconds": round(timer.seconds, 3),
        "tokens_per_s": round(rate, 1),
        "mfu": round(rate * per_token / peak, 4),
        "peak_flops": peak,
        "peak_source": source,
        "peak_memory_gib": memory,
    }


def environment(device: torch.device) -> dict[str, Any]:
    import lightning

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine() or "cpu"
    missing = deepspeed_missing()
    deepspeed = None if missing else importlib.import_module("deepspeed").__version__
    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": name,
        "device_type": device.type,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "lightning": lightning.__version__,
        "python": platform.python_version(),
        "deepspeed": deepspeed,
    }


def markdown(report: dict[str, Any]) -> str:
    env = report["environment"]
    shapes = "tiny smoke-test shapes" if report["tiny"] else "full shapes"
    lines = [
        f"# GPU check ({env['date']})",
        "",
        f"Device: {env['device']}; torch {env['torch']} (CUDA {env['cuda']}), "
        f"Lightning {env['lightning']}, Python {env['python']}, "
        f"DeepSpeed {env['deepspeed'] or 'not installed'}; {shapes}.",
        "",
        "| part | model | strategy (backend) | precision | batch × T | tokens/s | MFU "
        "| peak memory GiB | status |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        mfu = f"{100 * r['mfu']:.1f}%" if "mfu" in r else "–"
        memory = r.get("peak_memory_gib")
        lines.append(
            f"| {r['part']} | {r['model']} | {r.get('strategy', '–')} "
            f"({r.get('backend') or '–'}) | {r['precision']} "
            f"| {r['batch']} × {r['seq_len']} | {r.get('tokens_per_s', '–')} | {mfu} "
            f"| {'–' if memory is None else memory} | {r['status']} |"
        )
    gpt = next((r for r in report["results"] if r["part"] == "gpt2-124m" and "mfu" in r), None)
    if gpt is not None and not report["tiny"]:
        met = "met" if gpt["mfu"] >= MFU_GOAL_GPT else "not met"
        lines += ["", f"GPT-2 124M MFU goal ≥ {MFU_GOAL_GPT:.0%}: {met} ({100 * gpt['mfu']:.1f}%)."]
    lines += ["", f"MFU against {report['results'][0].get('peak_source', 'the device peak')}."]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out", type=Path, required=True, help="directory for gpu_check.json and gpu_check.md"
    )
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument(
        "--tiny", action="store_true", help="tiny models and batches: a smoke test in seconds"
    )
    parser.add_argument(
        "--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}"
    )
    parser.add_argument(
        "--precision",
        default=None,
        help="Lightning precision (default: bf16-mixed on cuda, 32-true on cpu)",
    )
    parser.add_argument(
        "--warmup", type=int, default=None, help="untimed steps first (default: 5; tiny: 1)"
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="timed steps (default: 20; tiny: 2)"
    )
    args = parser.parse_args(argv)
    unknown = sorted(set(args.parts.split(",")) - set(PARTS))
    if unknown:
        parser.error(f"--parts: unknown {unknown}; choose from {', '.join(PARTS)}")
    args.parts = args.parts.split(",")
    args.precision = args.precision or ("bf16-mixed" if args.device == "cuda" else "32-true")
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 5)
    args.steps = args.steps if args.steps is not None else (2 if args.tiny else 20)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error(
            "--device cuda: torch.cuda.is_available() is False "
            "(--device cpu --tiny is the smoke test)"
        )
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    started = time.perf_counter()
    report = {"environment": environment(device), "tiny": args.tiny, "results": []}
    for part in args.parts:
        t0 = time.perf_counter()
        record = run_part(part, args, device)
        record["wall_s"] = round(time.perf_counter() - t0, 1)
        report["results"].append(record)
        print(f"[gpu_check] {json.dumps(record)}", flush=True)
    report["wall_s"] = round(time.perf_counter() - started, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "gpu_check.md").write_text(markdown(report))
    print(markdown(report), flush=True)
    return report


if __name__ == "__main__":
    main()
