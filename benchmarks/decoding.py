"""Decoding speed, fp32 on CPU: Kiln's beam_search against transformers' generate(num_beams=5), same weights.

    .venv/bin/python benchmarks/decoding.py [--checkpoint DIR] [--data DIR] [--models trained,small]
                                            [--sources 300] [--small-sources 32] [--rounds 3] [--threads 1]

The HF side is `kiln export --format hf` of the very same checkpoint, loaded as `transformers.EncoderDecoderModel`
(BertModel encoder, GPT2LMHeadModel decoder with cross-attention). Two models:
- `trained`: the quickstart's warm-started translation checkpoint (BERT 2x128 + GPT 2x128, vocabulary 4096, English
  -> French numbers; `make quickstart` writes it) on the quickstart data's test sources;
- `small`: the BERT "small" + GPT "small" presets (4 layers x 512 each) with seeded random weights and the same
  tokenizer and sources. Random weights never favour [EOS], so every hypothesis runs to max_len: this measures
  the per-step cost of a 4x512 decoder at full length.

Matched settings: beam 5; batches of 32 sources sorted by length (the same batches on both sides); at most
max_len generated tokens, [EOS] included (HF: max_new_tokens); the length penalty in HF's form,
score = sum log p / |y|^alpha with |y| the generated tokens including [EOS] and excluding the decoder start token
(transformers' `_update_finished_beams`: `(cur_len + 1 - decoder_prompt_len) ** length_penalty`), which is Kiln's
"avg" penalty; alpha = 1.0, HF's default. Stopping: Kiln stops a source once no alive beam can beat its best
finished hypothesis (the bound at max_len); HF's `early_stopping="never"` is the same bound, so outputs should be
identical (fraction reported). HF's default `early_stopping=False` (a cheaper heuristic) is timed as well.
Target tokens/s = generated tokens of the returned hypotheses ([EOS] counted) / wall time, median (min-max) over
rounds in which the contenders alternate. Results: benchmarks/results/decoding.md (see --out).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runnable as a script from anywhere, like the CLI's `python -m`

from cluster.evaluation import read_split  # noqa: E402
from data_pipeline.configlib import from_preset  # noqa: E402
from finetune.decode import beam_search  # noqa: E402
from finetune.models import load_finetuned  # noqa: E402
from finetune.models.seq2seq import Seq2SeqConfig, WarmStartedSeq2Seq  # noqa: E402
from finetune.translate import encode_sources, pad_batch  # noqa: E402
from pretrain.checkpoint import save_checkpoint  # noqa: E402
from pretrain.hf_export import export_hf  # noqa: E402
from pretrain.models.bert import BertConfig  # noqa: E402
from pretrain.models.gpt import GPTConfig  # noqa: E402

PAD, BOS, EOS = 0, 5, 6  # docs/design.md; the export checks the tokenizer has them
BEAM, BATCH, ALPHA = 5, 32, 1.0
GOAL = 3.0  # Kiln / HF target tokens/s the issue asks for
QUICKSTART = ROOT / "runs" / "quickstart"
Batch = tuple[Tensor, Tensor]


@dataclass
class Contender:
    name: str
    decode: Callable[
        [Batch], list[list[int]]
    ]  # one batch -> per source the generated ids, no [BOS]/[EOS]
    tokens_per_s: list[float] = field(default_factory=list)  # per round, wall clock
    cpu_tokens_per_s: list[float] = field(
        default_factory=list
    )  # per round, this process's CPU time
    outputs: list[list[int]] = field(default_factory=list)
    counter: dict[str, int] = field(
        default_factory=dict
    )  # the decoder's running counts (count_decoder_work)
    work: dict[str, int] = field(
        default_factory=dict
    )  # decoder calls and token positions of the last round


def count_decoder_work(decoder: nn.Module) -> dict[str, int]:
    """Running counts of the decoder's calls and of the token positions it runs (rows x new tokens each call)."""
    counter = {"calls": 0, "positions": 0}

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        ids = args[0] if args else kwargs.get("input_ids")
        counter["calls"] += 1
        counter["positions"] += 0 if ids is None else ids.numel()

    decoder.register_forward_pre_hook(hook, with_kwargs=True)
    return counter


def kiln_contender(model: nn.Module, max_len: int) -> Contender:
    def decode(batch: Batch) -> list[list[int]]:
        hyps = beam_search(
            model, *batch, BOS, EOS, max_len, beam_size=BEAM, length_penalty="avg", alpha=ALPHA
        )
        return [h[0].tokens for h in hyps]

    return Contender("Kiln beam_search", decode)


def hf_contender(model: nn.Module, max_len: int, early_stopping: bool | str) -> Contender:
    def decode(batch: Batch) -> list[list[int]]:
        ids, mask = batch
        out = model.generate(
            ids,
            attention_mask=mask,
            num_beams=BEAM,
            max_new_tokens=max_len,
            do_sample=False,
            length_penalty=ALPHA,
            early_stopping=early_stopping,
        )
        rows = []
        for row in out[:, 1:].tolist():  # drop the decoder start token ([BOS])
            rows.append(row[: row.index(EOS)] if EOS in row else _strip_pad(row))
        return rows

    return Contender(f"HF generate (early_stopping={early_stopping!r})", decode)


def _strip_pad(row: list[int]) -> list[int]:
    while row and row[-1] == PAD:  # HF pads rows that finished before the batch's longest
        row = row[:-1]
    return row


def generated_tokens(outputs: list[list[int]], max_len: int) -> int:
    """Tokens each returned hypothesis generated: its ids plus [EOS], unless it was cut off at max_len."""
    return sum(min(len(o) + 1, max_len) for o in outputs)


def measure(contenders: list[Contender], batches: list[Batch], max_len: int, rounds: int) -> None:
    """One warm-up batch each, then `rounds` rounds over all batches, the contenders' order alternating."""
    with torch.no_grad():
        for c in contenders:
            c.decode(batches[0])
        for r in range(rounds):
            for c in contenders if r % 2 == 0 else contenders[::-1]:
                before = dict(c.counter)
                start, cpu_start = time.perf_counter(), time.process_time()
                outputs = [o for b in batches for o in c.decode(b)]
                tokens = generated_tokens(outputs, max_len)
                c.tokens_per_s.append(tokens / (time.perf_counter() - start))
                c.cpu_tokens_per_s.append(tokens / (time.process_time() - cpu_start))
                c.work = {k: v - before.get(k, 0) for k, v in c.counter.items()}
                c.outputs = outputs


def sources(data: Path, tokenizer_file: Path, n: int) -> list[Batch]:
    from tokenizers import Tokenizer

    texts = read_split(data / "translation", "test", ["src_text"])["src_text"][:n]
    rows = sorted(encode_sources(Tokenizer.from_file(str(tokenizer_file)), texts, 128), key=len)
    return [
        pad_batch(rows[i : i + BATCH], PAD, torch.device("cpu")) for i in range(0, len(rows), BATCH)
    ]


def small_checkpoint(tmp: Path, tokenizer_file: Path, vocab_size: int) -> Path:
    torch.manual_seed(0)
    config = Seq2SeqConfig(
        encoder=from_preset(BertConfig, "small", vocab_size=vocab_size),
        decoder=from_preset(GPTConfig, "small", vocab_size=vocab_size, add_cross_attention=True),
    )
    return save_checkpoint(tmp / "small", WarmStartedSeq2Seq(config), config, tokenizer_file)


@dataclass
class Result:
    model: str
    sources: int
    max_len: int
    kiln: Contender
    hf: list[Contender]

    def identical(self, hf: Contender) -> float:
        return sum(a == b for a, b in zip(self.kiln.outputs, hf.outputs, strict=True)) / len(
            self.kiln.outputs
        )


def run_model(
    name: str, checkpoint: Path, data: Path, n: int, max_len: int, rounds: int, tmp: Path
) -> Result:
    import transformers

    kiln = load_finetuned(checkpoint).model.eval()
    hf = transformers.EncoderDecoderModel.from_pretrained(
        export_hf(checkpoint, tmp / f"hf-{name}")
    ).eval()
    batches = sources(data, checkpoint / "tokenizer.json", n)
    contenders = [
        kiln_contender(kiln, max_len),
        hf_contender(hf, max_len, "never"),
        hf_contender(hf, max_len, False),
    ]
    contenders[0].counter = count_decoder_work(kiln.decoder)
    contenders[1].counter = contenders[2].counter = count_decoder_work(
        hf.decoder
    )  # one model, counted by deltas
    measure(contenders, batches, max_len, rounds)
    result = Result(
        name, sum(b[0].size(0) for b in batches), max_len, contenders[0], contenders[1:]
    )
    for c in contenders:
        print(f"[bench] {name}: {c.name}: {_tps(c)} tokens/s", flush=True)
    return result


def _tps(c: Contender) -> str:
    return f"{statistics.median(c.tokens_per_s):.0f} ({min(c.tokens_per_s):.0f}-{max(c.tokens_per_s):.0f})"


def _ratios(a: Contender, b: Contender, cpu: bool = False) -> list[float]:
    """a / b per round: the two ran back to back in that round, so a neighbour's load hits both alike."""
    xs, ys = (a.cpu_tokens_per_s, b.cpu_tokens_per_s) if cpu else (a.tokens_per_s, b.tokens_per_s)
    return [x / y for x, y in zip(xs, ys, strict=True)]


def _ratio(a: Contender, b: Contender) -> float:
    return statistics.median(_ratios(a, b))


def _ratio_text(a: Contender, b: Contender) -> str:
    r, cpu = _ratios(a, b), _ratios(a, b, cpu=True)
    return f"{statistics.median(r):.2f}x ({min(r):.2f}-{max(r):.2f}); CPU time {statistics.median(cpu):.2f}x"


def table(results: list[Result]) -> str:
    lines = [
        '| model | sources | max_len | Kiln tokens/s | HF tokens/s, early_stopping="never" (matched) | '
        "Kiln / HF | identical outputs | HF tokens/s, early_stopping=False (HF default) | Kiln / HF | "
        "identical outputs |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        matched, default = r.hf
        lines.append(
            f"| {r.model} | {r.sources} | {r.max_len} | {_tps(r.kiln)} | {_tps(matched)} | "
            f"{_ratio_text(r.kiln, matched)} | {r.identical(matched):.1%} | {_tps(default)} | "
            f"{_ratio_text(r.kiln, default)} | {r.identical(default):.1%} |"
        )
    return "\n".join(lines)


def work_table(results: list[Result]) -> str:
    lines = [
        "| model | contender | decoder calls | decoder token positions | generated tokens |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        for c in (r.kiln, *r.hf):
            lines.append(
                f"| {r.model} | {c.name} | {c.work.get('calls', 0)} | {c.work.get('positions', 0)} | "
                f"{generated_tokens(c.outputs, r.max_len)} |"
            )
    return "\n".join(lines)


WHY = """Why the two models differ. Per decoder call both sides do the same matrix products (the same weights, one
new position per hypothesis, KV caches on both sides), so the speed-up can only come from doing fewer calls on
fewer rows and from less Python around each call:
- Kiln stops a source as soon as its best finished hypothesis scores at least the bound on any alive beam and
  drops it from the batch (its memory, mask and cache rows go); HF keeps every source of a batch in the batch
  until the last one is done, and with early_stopping="never" a source is only done once num_beams (5)
  hypotheses are finished and the bound holds for the worst of them. The trained model is confident and its
  outputs are short (generated tokens / sources above), so most of the work HF does is avoided (token positions).
- The first step runs one row per source instead of five (the five beams are identical before the first token).
- Per step, Kiln's search is a handful of tensor ops on (N, 2K) candidates; HF's generate adds logits
  processors, stopping criteria and its static (batch, beams, max_length) bookkeeping tensors.
The random 4x512 model never favours [EOS], so every hypothesis runs to max_len on both sides, nothing can be
dropped or stopped early, and the time is the decoder's matrix products: there Kiln and HF are at parity, and the
3x goal is not reachable by search code alone. Same weights and the same stopping bound give identical outputs."""


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def report(
    results: list[Result],
    command: str,
    load: tuple[tuple[float, ...], ...],
    rounds: int,
    threads: int,
) -> str:
    import transformers

    ratios = [_ratio(r.kiln, r.hf[0]) for r in results]
    loads = " / ".join(", ".join(f"{v:.2f}" for v in x) for x in load)
    return "\n".join(
        [
            "# Decoding speed: Kiln beam search vs Hugging Face `generate(num_beams=5)` (fp32, CPU)",
            "",
            f"- date: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M UTC}",
            f"- machine: {_cpu_name()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}; "
            f"torch threads: {threads}",
            f"- command: `{command}`",
            f"- torch {torch.__version__}, transformers {transformers.__version__}, Python {platform.python_version()}",
            f"- beam {BEAM}, batches of {BATCH} sources sorted by length, length penalty score = logprob / |y|^{ALPHA} "
            'on both sides (Kiln "avg", HF\'s length_penalty; |y| counts [EOS], not the start token); '
            f"{rounds} rounds, contenders alternating; tokens/s = median (min-max) over rounds, wall clock; "
            "Kiln / HF = median (min-max) of the per-round wall-clock ratios, then the median ratio of "
            "tokens per CPU second of "
            "this process (less sensitive to the neighbours' load on a shared machine)",
            f"- load average (1, 5, 15 min) at start / end: {loads}: the machine is shared, so absolute numbers move "
            "with the neighbours' load; ratios, timed in alternation, move much less",
            "",
            table(results),
            "",
            "Work done in the last round (decoder token positions = rows x new tokens summed over decoder calls):",
            "",
            work_table(results),
            "",
            WHY,
            "",
            f"Goal: Kiln >= {GOAL}x HF's target tokens/s at matched settings (wall clock, median of rounds): "
            + "; ".join(
                f"{r.model} {x:.2f}x, {'met' if x >= GOAL else 'not met'}"
                for r, x in zip(results, ratios, strict=True)
            )
            + ".",
            "",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--checkpoint",
        type=Path,
        help="trained translation checkpoint [newest under "
        "runs/quickstart/translation/checkpoints]",
    )
    parser.add_argument(
        "--data", type=Path, default=QUICKSTART / "data", help="prepared data (test sources)"
    )
    parser.add_argument("--models", default="trained,small", help="comma-separated: trained, small")
    parser.add_argument("--sources", type=int, default=300, help="sources for the trained model")
    parser.add_argument(
        "--small-sources", type=int, default=32, help="sources for the random small model"
    )
    parser.add_argument(
        "--max-len", type=int, default=64, help="generated tokens at most, [EOS] included"
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "decoding.md")
    args = parser.parse_args(argv)
    checkpoint = args.checkpoint or max(
        (QUICKSTART / "translation" / "checkpoints").glob("step-*"), default=None
    )
    if checkpoint is None or not (args.data / "translation").is_dir():
        parser.error(
            "needs a translation checkpoint and prepared data: run `make quickstart` or pass --checkpoint "
            "and --data"
        )
    torch.set_num_threads(args.threads)
    import transformers

    transformers.logging.set_verbosity_error()
    start_load = os.getloadavg()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            if name == "trained":
                results.append(
                    run_model(
                        "trained 2x128 (quickstart)",
                        checkpoint,
                        args.data,
                        args.sources,
                        args.max_len,
                        args.rounds,
                        Path(tmp),
                    )
                )
            elif name == "small":
                vocab = load_finetuned(checkpoint).model_config.decoder.vocab_size
                small = small_checkpoint(Path(tmp), checkpoint / "tokenizer.json", vocab)
                results.append(
                    run_model(
                        "random small 4x512",
                        small,
                        args.data,
                        args.small_sources,
                        args.max_len,
                        args.rounds,
                        Path(tmp),
                    )
                )
            else:
                parser.error(f"--models: unknown {name!r} (trained, small)")
    command = " ".join(["python", *sys.argv]) if argv is None else " ".join(argv)
    text = report(results, command, (start_load, os.getloadavg()), args.rounds, args.threads)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
