"""SlimSet curation: from prompt sources to a small, diverse, deduplicated calibration set.

Steps (``curate``): normalise -> drop empties -> exact dedupe (case-insensitive) -> drop prompts longer
than the tokenizer allows -> drop near duplicates (cosine similarity of the model's own text
embeddings >= threshold, keep the first) -> k-center greedy selection of ``n`` on the unit-norm
embeddings, with per-domain quotas when the sources carry a ``domain`` column.

The math (``normalise``, ``near_duplicate_mask``, ``allocate_quotas``, ``k_center_greedy``,
``coverage``) takes lists and tensors and does no I/O. ``load_prompt_sources``, ``write_slimset`` and
``main`` know files. Run ``python -m slimdiff.pipeline.curation --help``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
import unicodedata
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor

PROMPT_COLUMNS = ("prompt", "text", "caption")

DOMAIN_COLUMN = "domain"

FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}

NO_DOMAIN = "(none)"  # label of prompts without a domain in stats and charts

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(:[\w.-]+){0,2}$")

_QUOTES = ("\"\"", "''", "\u201c\u201d", "\u2018\u2019", "``")

EXAMPLES = 10  # examples of each kind of dropped prompt kept in the stats


class CurationError(ValueError):
    """Bad curation input a user can fix (missing file, empty source, unknown format, bad column)."""


def normalise(text: str | None) -> str:
    """Unicode NFKC, whitespace collapsed to single spaces, stripped, one pair of surrounding quotes removed."""
    if text is None:
        return ""
    text = " ".join(unicodedata.normalize("NFKC", str(text)).split())
    while len(text) >= 2 and any(text[0] == q[0] and text[-1] == q[1] for q in _QUOTES):
        text = text[1:-1].strip()
    return text


def _is_hub_id(source: str) -> bool:
    return Path(source).suffix.lower() not in FORMATS and bool(HUB_ID.match(source)) and not Path(source).exists()


def _source_files(source: str) -> list[Path]:
    """The files a local source names: the file itself, or every supported file in a folder (sorted)."""
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in FORMATS)
        if not files:
            raise CurationError(f"prompt folder {path} holds no {', '.join(sorted(FORMATS))} files")
        return files
    if not path.exists():
        raise CurationError(f"prompt source not found: {source} (a {'/'.join(sorted(FORMATS))} file, a folder of them, "
                            f"or a hub dataset id owner/name[:split[:column]])")
    if path.suffix.lower() not in FORMATS:
        raise CurationError(f"unknown prompt file format {path.suffix or '(no suffix)'!r} for {path}; "
                            f"use one of {', '.join(sorted(FORMATS))}")
    return [path]


def _prompt_column(columns: Sequence[str], where: str, wanted: str | None = None) -> str:
    if wanted is not None:
        if wanted not in columns:
            raise CurationError(f"{where} has no column {wanted!r}; its columns are {list(columns)}")
        return wanted
    for name in PROMPT_COLUMNS:
        if name in columns:
            return name
    raise CurationError(f"{where} has no prompt column ({'/'.join(PROMPT_COLUMNS)}); its columns are {list(columns)}")


def _standardise(table, where: str, source: str, column: str | None = None):
    """A loaded table as columns prompt (raw string), domain ('' when absent) and source."""
    from datasets import Dataset

    prompt_column = _prompt_column(table.column_names, where, column)
    prompts = ["" if p is None else str(p) for p in table[prompt_column]]
    if DOMAIN_COLUMN in table.column_names:
        domains = [normalise(d) for d in table[DOMAIN_COLUMN]]
    else:
        domains = [""] * len(prompts)
    if not any(normalise(p) for p in prompts):
        raise CurationError(f"prompt source {where} holds no prompts (column {prompt_column!r} is empty)")
    return Dataset.from_dict({"prompt": prompts, "domain": domains, "source": [source] * len(prompts)})


def _load_file(path: Path, cache_dir: str | None):
    import datasets

    if path.stat().st_size == 0:
        raise CurationError(f"prompt file {path} is empty")
    builder = FORMATS[path.suffix.lower()]
    try:
        table = datasets.load_dataset(builder, data_files=str(path), split="train", cache_dir=cache_dir)
    except Exception as error:  # datasets wraps parser errors in several types
        cause = error.__cause__ or error
        raise CurationError(f"prompt file {path} could not be read as {builder}: {str(cause).splitlines()[0][:200]}") from None
    return _standardise(table, f"prompt file {path}", str(path))


def _load_hub(source: str, cache_dir: str | None):
    import datasets

    name, split, column = (source.split(":") + [None, None])[:3]
    offline = any(os.environ.get(key, "").lower() in ("1", "true", "yes", "on") for key in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))
    if offline:
        raise CurationError(f"prompt source {name!r} is not a local file or folder, and as a hub dataset id it needs the "
                            f"network, but HF_DATASETS_OFFLINE/HF_HUB_OFFLINE is set; save it as a file under data/ and pass that path")
    try:
        table = datasets.load_dataset(name, split=split or "train", cache_dir=cache_dir)
    except Exception as error:
        raise CurationError(f"hub dataset {name!r} (split {split or 'train'!r}) could not be loaded: "
                            f"{str(error).splitlines()[0][:200] if str(error) else type(error).__name__}") from None
    return _standardise(table, f"hub dataset {name}", source, column)


def load_prompt_sources(sources: Sequence[str], cache_dir: str | None = None):
    """Concatenate prompt sources into one ``datasets.Dataset`` with columns prompt, domain, source.

    A source is a local .json/.jsonl/.csv/.parquet/.txt file, a folder of such files, or a hub dataset
    id ``owner/name[:split[:column]]`` (online only). The prompt column is ``prompt``, ``text`` or
    ``caption``; an optional ``domain`` column is kept ('' where absent). Prompts are returned raw;
    ``curate`` normalises them.
    """
    import datasets

    if not sources:
        raise CurationError("no prompt sources given")
    parts = []
    for source in sources:
        if _is_hub_id(source):
            parts.append(_load_hub(source, cache_dir))
        else:
            parts.extend(_load_file(path, cache_dir) for path in _source_files(source))
    return datasets.concatenate_datasets(parts)


def near_duplicate_mask(embeddings: Tensor, threshold: float, block: int = 1024) -> tuple[Tensor, Tensor]:
    """Greedy near-duplicate removal in input order on unit-norm rows.

    Row i is kept unless its cosine similarity to an earlier *kept* row is >= ``threshold``.
    Returns (keep mask (N,) bool, index of the kept row each dropped row duplicates, -1 for kept rows).
    """
    count = embeddings.shape[0]
    keep = torch.zeros(count, dtype=torch.bool)
    duplicate_of = torch.full((count,), -1, dtype=torch.long)
    kept_index = torch.empty(0, dtype=torch.long)
    for start in range(0, count, block):
        rows = embeddings[start:start + block]
        if kept_index.numel():
            sims = rows @ embeddings[kept_index].T
            best, where = sims.max(dim=1)
            clash = best >= threshold
            duplicate_of[start:start + len(rows)][clash] = kept_index[where[clash]]
        else:
            clash = torch.zeros(len(rows), dtype=torch.bool)
        inner = (rows @ rows.T >= threshold).tril(diagonal=-1)
        block_kept: list[int] = []
        for i in range(len(rows)):
            if clash[i]:
                continue
            if block_kept:
                hits = inner[i, block_kept].nonzero()
                if hits.numel():
                    duplicate_of[start + i] = start + block_kept[int(hits[0])]
                    continue
            block_kept.append(i)
        new = torch.tensor(block_kept, dtype=torch.long) + start
        keep[new] = True
        kept_index = torch.cat([kept_index, new])
    return keep, duplicate_of


def allocate_quotas(sizes: dict[str, int], n: int) -> dict[str, int]:
    """Split ``n`` across strata proportionally to ``sizes`` by largest remainder, at least 1 each.

    Needs n <= sum(sizes). When n is smaller than the number of strata the n largest strata get 1.
    Ties break by stratum name, so the result is deterministic.
    """
    total = sum(sizes.values())
    if n > total:
        raise ValueError(f"cannot allocate {n} from strata holding {total} items")
    names = sorted(sizes)
    if n < len(names):
        largest = sorted(names, key=lambda d: (-sizes[d], d))[:n]
        return {d: int(d in largest) for d in names}
    share = {d: n * sizes[d] / total for d in names}
    quota = {d: math.floor(share[d]) for d in names}
    left = n - sum(quota.values())
    for d in sorted(names, key=lambda d: (-(share[d] - quota[d]), -sizes[d], d))[:left]:
        quota[d] += 1
    for d in sorted((d for d in names if quota[d] == 0), key=lambda d: (-share[d], d)):
        donor = max((e for e in names if quota[e] > 1), key=lambda e: (quota[e] - share[e], sizes[e], e))
        quota[donor] -= 1
        quota[d] = 1
    return quota


def k_center_greedy(embeddings: Tensor, n: int, seed: int = 0, groups: Sequence[int] | None = None,
                    quotas: dict[int, int] | None = None) -> list[int]:
    """Greedy k-center (farthest point) selection of ``n`` rows, in selection order.

    The first row is drawn with ``torch.Generator().manual_seed(seed)``; each next row is the one
    farthest (Euclidean) from all rows selected so far, ties to the lowest index. With ``groups``
    (a group id per row) and ``quotas`` (rows to take per group), a row is only eligible while its
    group is under quota: a global farthest-point order that meets the quotas exactly.
    """
    count = embeddings.shape[0]
    if not 0 <= n <= count:
        raise ValueError(f"cannot select {n} of {count} rows")
    if n == 0:
        return []
    group_of = torch.as_tensor(list(groups) if groups is not None else [0] * count, dtype=torch.long)
    left = dict(quotas) if quotas is not None else {0: n}
    if sum(left.values()) != n:
        raise ValueError(f"quotas {left} do not add up to n={n}")
    eligible = torch.tensor([left.get(int(g), 0) > 0 for g in group_of], dtype=torch.bool)
    points = embeddings.to(torch.float64)
    min_dist = torch.full((count,), math.inf, dtype=torch.float64)
    generator = torch.Generator().manual_seed(seed)
    candidates = eligible.nonzero().flatten()
    first = int(candidates[torch.randint(len(candidates), (1,), generator=generator)])
    chosen: list[int] = []
    current = first
    for _ in range(n):
        chosen.append(current)
        group = int(group_of[current])
        left[group] -= 1
        eligible[current] = False
        if left[group] == 0:
            eligible &= group_of != group
        dist = (points - points[current]).norm(dim=1)
        min_dist = torch.minimum(min_dist, dist)
        if len(chosen) == n:
            break
        score = torch.where(eligible, min_dist, torch.tensor(-1.0, dtype=torch.float64))
        current = int(score.argmax())
    return chosen


def coverage(embeddings: Tensor, selected: Sequence[int], block: int = 4096) -> dict[str, float]:
    """Mean and max Euclidean distance of every row to its nearest selected row."""
    if not len(selected):
        return {"mean": float("nan"), "max": float("nan")}
    centers = embeddings[list(selected)].to(torch.float64)
    nearest = torch.cat([torch.cdist(embeddings[i:i + block].to(torch.float64), centers).min(dim=1).values
                         for i in range(0, embeddings.shape[0], block)])
    return {"mean": float(nearest.mean()), "max": float(nearest.max())}


def _count_by(labels: Sequence[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for label in labels:
        counts[label or NO_DOMAIN] = counts.get(label or NO_DOMAIN, 0) + 1
    return dict(sorted(counts.items()))


def curate(dataset, embed: Callable[[list[str]], Tensor], count_tokens: Callable[[str], int], max_tokens: int,
           n: int = 500, near_duplicate: float = 0.95, seed: int = 0, center: bool = True):
    """Deduplicate, length-filter and select a diverse SlimSet of ``n`` prompts.

    ``dataset`` has columns prompt (raw), and optionally domain and source. Returns the selected
    ``datasets.Dataset`` (columns prompt, domain, source, order; rows in selection order) and a stats
    dict with the counts at each step, per-domain counts, coverage and ``short_by`` (how many fewer
    than ``n`` prompts were available; 0 when none).

    With ``center`` the embeddings are centred on their mean (over the prompts that pass the length
    filter) before L2-normalising: mean-pooled text embeddings share one large direction, which makes
    unrelated prompts look >0.8 similar and would turn the near-duplicate threshold into a coin toss.
    """
    from datasets import Dataset

    if n < 1:
        raise ValueError(f"n must be a positive number of prompts, got {n}")
    if not 0.0 < near_duplicate <= 1.0:
        raise ValueError(f"near_duplicate must be a cosine similarity in (0, 1], got {near_duplicate}")
    if "prompt" not in dataset.column_names:
        raise ValueError(f"dataset has no 'prompt' column; its columns are {dataset.column_names} (load_prompt_sources makes one)")
    raw = list(dataset["prompt"])
    domains_in = list(dataset["domain"]) if DOMAIN_COLUMN in dataset.column_names else [""] * len(raw)
    sources_in = list(dataset["source"]) if "source" in dataset.column_names else [""] * len(raw)
    domains_in = [normalise(d) for d in domains_in]
    stratified = any(domains_in)
    counts: dict[str, int] = {"input": len(raw)}
    examples: dict[str, list] = {"exact_duplicates": [], "too_long": [], "near_duplicates": []}

    # normalise, drop empties, exact dedupe (first occurrence wins)
    rows: list[int] = []
    prompts: dict[int, str] = {}
    seen: dict[str, int] = {}
    empty = 0
    for index, text in enumerate(raw):
        clean = normalise(text)
        if not clean:
            empty += 1
            continue
        key = clean.casefold()
        if key in seen:
            if len(examples["exact_duplicates"]) < EXAMPLES:
                examples["exact_duplicates"].append([clean, prompts[seen[key]]])
            continue
        seen[key] = index
        prompts[index] = clean
        rows.append(index)
    counts["empty"] = empty
    counts["exact_duplicates"] = len(raw) - empty - len(rows)
    counts["after_exact_dedupe"] = len(rows)

    # drop prompts the tokenizer would truncate
    short_rows = []
    lengths = []
    for index in rows:
        tokens = count_tokens(prompts[index])
        if tokens > max_tokens:
            if len(examples["too_long"]) < EXAMPLES:
                examples["too_long"].append([prompts[index], tokens])
            continue
        short_rows.append(index)
        lengths.append(tokens)
    counts["too_long"] = len(rows) - len(short_rows)
    counts["after_length_filter"] = len(short_rows)
    rows = short_rows

    # near duplicates on the model's own text embeddings
    if rows:
        embeddings = embed([prompts[i] for i in rows]).detach().to(torch.float32).cpu()
        if embeddings.shape[0] != len(rows):
            raise ValueError(f"embed returned {embeddings.shape[0]} rows for {len(rows)} prompts")
        if center and embeddings.shape[0] > 1:
            embeddings = embeddings - embeddings.mean(dim=0)
        embeddings = torch.nn.functional.normalize(embeddings, dim=1)
        keep, duplicate_of = near_duplicate_mask(embeddings, near_duplicate)
        for position in (~keep).nonzero().flatten().tolist()[:EXAMPLES]:
            other = int(duplicate_of[position])
            similarity = float(embeddings[position] @ embeddings[other])
            examples["near_duplicates"].append([prompts[rows[position]], prompts[rows[other]], round(similarity, 4)])
        rows = [row for row, kept in zip(rows, keep.tolist()) if kept]
        lengths = [length for length, kept in zip(lengths, keep.tolist()) if kept]
        embeddings = embeddings[keep]
    else:
        embeddings = torch.zeros(0, 1)
    counts["near_duplicates"] = counts["after_length_filter"] - len(rows)
    counts["available"] = len(rows)

    # k-center greedy, with per-domain quotas
    available = len(rows)
    take = min(n, available)
    labels = [domains_in[i] or NO_DOMAIN for i in rows]
    sizes = _count_by(labels)
    if stratified and take:
        names = sorted(sizes)
        quota = allocate_quotas(sizes, take)
        group_id = {name: g for g, name in enumerate(names)}
        order = k_center_greedy(embeddings, take, seed, [group_id[label] for label in labels],
                                {group_id[name]: quota[name] for name in names})
    else:
        quota = {}
        order = k_center_greedy(embeddings, take, seed)
    counts["selected"] = len(order)

    selected = Dataset.from_dict({
        "prompt": [prompts[rows[i]] for i in order],
        "domain": [domains_in[rows[i]] for i in order],
        "source": [sources_in[rows[i]] for i in order],
        "order": list(range(len(order))),
    })
    short_by = max(0, n - available)
    warnings = []
    if short_by:
        warnings.append(f"only {available} prompts survived deduplication and filtering; selected all of them, "
                        f"{short_by} short of the {n} requested")
    random_pick = torch.randperm(available, generator=torch.Generator().manual_seed(seed))[:take].tolist()
    stats = {
        "params": {"n": n, "near_duplicate": near_duplicate, "seed": seed, "max_tokens": max_tokens, "center": center,
                   "embedding_dim": int(embeddings.shape[1]) if available else None},
        "n_requested": n,
        "n_available": available,
        "n_selected": len(order),
        "short_by": short_by,
        "warnings": warnings,
        "counts": counts,
        "domains": {
            "stratified": stratified,
            "input": _count_by([domains_in[i] for i in range(len(raw)) if normalise(raw[i])]),
            "available": sizes,
            "quota": quota,
            "selected": _count_by(list(selected["domain"])),
        },
        "tokens": {"selected_mean": (sum(lengths[i] for i in order) / len(order)) if order else None,
                   "selected_max": max((lengths[i] for i in order), default=None)},
        "coverage": {
            "metric": "euclidean distance of each available prompt to its nearest selected prompt (unit-norm embeddings)",
            "selected": coverage(embeddings, order) if available else None,
            "random_same_size": coverage(embeddings, random_pick) if available else None,
        },
        "examples": examples,
    }
    return selected, stats


def token_counter(tokenizer) -> Callable[[str], int]:
    """Number of tokens the tokenizer produces for a prompt, special tokens included, no truncation.

    Compare with ``tokenizer.model_max_length``.
    """
    def count_tokens(text: str) -> int:
        return len(tokenizer(text, truncation=False, add_special_tokens=True, verbose=False)["input_ids"])
    return count_tokens


def text_embedder(pipe, batch_size: int = 64, progress: bool = True) -> Callable[[list[str]], Tensor]:
    """Embed prompts with the pipeline's own ``tokenizer`` and ``text_encoder``.

    Mean of the last hidden state over the prompt's tokens (no padding, no BOS/EOS; all non-padding
    tokens if a prompt has no others), L2-normalised, float32 on CPU. ``pipe`` may be any object with
    ``tokenizer`` and ``text_encoder`` attributes.
    """
    from tqdm.auto import tqdm

    tokenizer, encoder = pipe.tokenizer, pipe.text_encoder
    if tokenizer is None or encoder is None:
        raise ValueError("the pipeline has no tokenizer/text_encoder to embed prompts with")
    max_length = int(tokenizer.model_max_length)

    @torch.inference_mode()
    def embed(prompts: list[str]) -> Tensor:
        device = next(encoder.parameters()).device
        out = []
        for start in tqdm(range(0, len(prompts), batch_size), desc="embed prompts", unit="batch",
                          disable=not progress or len(prompts) <= batch_size):
            batch = tokenizer(list(prompts[start:start + batch_size]), padding=True, truncation=True,
                              max_length=max_length, return_tensors="pt", return_special_tokens_mask=True)
            mask = batch["attention_mask"].to(device)
            hidden = encoder(input_ids=batch["input_ids"].to(device), attention_mask=mask).last_hidden_state
            # pool over the prompt's own tokens: CLIP's BOS state is the same for every prompt (causal mask)
            words = mask * (1 - batch["special_tokens_mask"].to(device))
            words = torch.where(words.sum(dim=1, keepdim=True) > 0, words, mask)
            weights = words.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)
            out.append(torch.nn.functional.normalize(pooled.float(), dim=1).cpu())
        return torch.cat(out) if out else torch.zeros(0, encoder.config.hidden_size)
    return embed


def load_text_encoder(model: str | Path):
    """The tokenizer and text encoder of a local diffusers pipeline folder (nothing else is loaded)."""
    import transformers

    from slimdiff.environment import quiet_libraries

    quiet_libraries()
    path = Path(model)
    if not (path / "tokenizer").is_dir() or not (path / "text_encoder").is_dir():
        raise CurationError(f"model folder {path} has no tokenizer/ and text_encoder/ subfolders "
                            f"(expected a diffusers pipeline folder saved with save_pretrained)")
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, subfolder="tokenizer")
    config = transformers.AutoConfig.from_pretrained(path, subfolder="text_encoder")
    # the saved architecture (CLIPTextModel, T5EncoderModel, BertModel...) rather than AutoModel, which would
    # give T5 its decoder too
    architecture = next(iter(getattr(config, "architectures", None) or []), None)
    encoder_class = getattr(transformers, architecture, None) if architecture else None
    encoder = (encoder_class or transformers.AutoModel).from_pretrained(path, subfolder="text_encoder").eval()
    return tokenizer, encoder


def write_slimset(selected, stats: dict, out_dir: str | Path) -> Path:
    """Write ``slimset.jsonl``, ``slimset_stats.json`` (with ``digest``) and ``slimset_domains.png``
    (per-domain counts at input, after deduplication/filters, and selected).

    The digest is ``slimdiff.runtime.sampling.prompts_digest`` of the selected prompts, the same one a capture
    of this SlimSet records. Returns the path of ``slimset.jsonl``.
    """
    from slimdiff.files import atomic_path, write_json
    from slimdiff.runtime.sampling import prompts_digest

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    prompts = list(selected["prompt"])
    rows = zip(prompts, selected["domain"], selected["source"])
    path = out / "slimset.jsonl"
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps({"prompt": p, "domain": d, "source": s}, ensure_ascii=False) + "\n"
                               for p, d, s in rows), encoding="utf-8")
    write_json(out / "slimset_stats.json", {**stats, "digest": prompts_digest(prompts), "num_prompts": len(prompts)})
    _plot_domains(stats, out / "slimset_domains.png")
    return path


def _plot_domains(stats: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from slimdiff.files import atomic_path

    domains = stats["domains"]
    names = sorted(set(domains["input"]) | set(domains["selected"]))
    x = range(len(names))
    fig, ax = plt.subplots(figsize=(max(4.0, 0.7 * len(names) + 2), 3.5))
    width = 0.27
    for shift, key, label in ((-width, "input", "input"), (0.0, "available", "after dedupe/filters"),
                              (width, "selected", "selected")):
        bars = ax.bar([i + shift for i in x], [domains[key].get(name, 0) for name in names], width, label=label)
        if key == "selected":
            ax.bar_label(bars, fontsize=7)
    ax.set_xticks(list(x), names, rotation=30, ha="right")
    ax.set_ylim(0, 1.25 * max([1, *domains["input"].values()]))
    ax.set_ylabel("prompts")
    ax.set_title(f"SlimSet domains ({stats['n_selected']} of {stats['counts']['input']} prompts)")
    ax.legend(fontsize=8, ncols=3, loc="upper center")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m slimdiff.pipeline.curation", description=__doc__.splitlines()[0])
    parser.add_argument("--sources", nargs="+", required=True,
                        help="prompt files (.json/.jsonl/.csv/.parquet/.txt), folders of them, or hub ids owner/name[:split[:column]]")
    parser.add_argument("--model", required=True, help="local diffusers pipeline folder (its tokenizer/ and text_encoder/ are used)")
    parser.add_argument("--n", type=int, default=500, help="prompts to select (default 500)")
    parser.add_argument("--out", required=True, help="output folder for slimset.jsonl, slimset_stats.json, slimset_domains.png")
    parser.add_argument("--near-duplicate", type=float, default=0.95, help="cosine similarity at or above which a prompt is a near duplicate")
    parser.add_argument("--max-tokens", type=int, default=None, help="token limit (default: the tokenizer's model_max_length)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.n < 1:
            raise CurationError(f"--n must be a positive number of prompts, got {args.n}")
        if not 0.0 < args.near_duplicate <= 1.0:
            raise CurationError(f"--near-duplicate must be a cosine similarity in (0, 1], got {args.near_duplicate}")
        import datasets
        from transformers.utils import logging as transformers_logging

        transformers_logging.set_verbosity_error()
        transformers_logging.disable_progress_bar()
        datasets.disable_progress_bars()
        started = time.perf_counter()
        table = load_prompt_sources(args.sources)
        tokenizer, encoder = load_text_encoder(args.model)
        max_tokens = args.max_tokens or int(tokenizer.model_max_length)
        if max_tokens > 100_000:
            raise CurationError(f"tokenizer of {args.model} has no real model_max_length ({max_tokens}); pass --max-tokens")
        pipe = argparse.Namespace(tokenizer=tokenizer, text_encoder=encoder)
        selected, stats = curate(table, text_embedder(pipe, args.batch_size, progress=not args.quiet),
                                 token_counter(tokenizer), max_tokens, args.n, args.near_duplicate, args.seed)
        stats["sources"] = list(args.sources)
        stats["model"] = str(args.model)
        stats["seconds"] = round(time.perf_counter() - started, 2)
        path = write_slimset(selected, stats, args.out)
    except (CurationError, FileNotFoundError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    counts = stats["counts"]
    print(f"{path}: {stats['n_selected']} prompts selected from {counts['input']} "
          f"(exact dups {counts['exact_duplicates']}, too long {counts['too_long']}, near dups {counts['near_duplicates']})")
    for warning in stats["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
