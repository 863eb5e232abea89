"""SlimSet curation: loading, normalising, dedupe, length filter, k-center, quotas, outputs, CLI, pool."""

from __future__ import annotations

import csv
import json
import zlib

import pytest
import torch

from slimdiff.pipeline import curation as C
from slimdiff.runtime.sampling import prompts_digest


def trigram_embed(prompts: list[str], dim: int = 128) -> torch.Tensor:
    """Deterministic bag of character trigrams, hashed into ``dim`` buckets (no model)."""
    out = torch.zeros(len(prompts), dim)
    for row, text in enumerate(prompts):
        padded = f"  {text.lower()}  "
        for i in range(len(padded) - 2):
            out[row, zlib.crc32(padded[i:i + 3].encode()) % dim] += 1.0
    return torch.nn.functional.normalize(out, dim=1)


def word_count(text: str) -> int:
    return len(text.split())


def table(prompts, domains=None, source="test"):
    from datasets import Dataset

    return Dataset.from_dict({"prompt": list(prompts), "domain": list(domains or [""] * len(prompts)),
                              "source": [source] * len(prompts)})


def lookup_embed(vectors: dict[str, torch.Tensor]):
    return lambda prompts: torch.stack([vectors[p] for p in prompts])


DIVERSE = ["a red fox in the snow", "a bowl of ramen on a wooden table", "a neon sign that says \"OPEN\"",
           "an astronaut riding a horse", "a watercolor painting of a lighthouse", "three cups on a shelf",
           "a busy street in tokyo at night", "a vintage car parked by the sea", "a portrait of an old fisherman",
           "a cozy library with a fireplace"]


# ------------------------------------------------------------------------------------------- loading


def test_every_file_format_loads(tmp_path):
    import pandas as pd

    (tmp_path / "list.json").write_text(json.dumps(["a cat", "a dog"]))
    (tmp_path / "objects.json").write_text(json.dumps([{"caption": "a red circle", "domain": "shapes"}]))
    (tmp_path / "lines.jsonl").write_text('{"prompt": "a boat"}\n{"prompt": "a car", "domain": "vehicles"}\n')
    (tmp_path / "table.csv").write_text('prompt,domain\n"a cup, on a table",objects\n')
    pd.DataFrame({"text": ["a tree", "a house"]}).to_parquet(tmp_path / "table.parquet")
    (tmp_path / "plain.txt").write_text("a bird\n\na fish\n")
    files = ["list.json", "objects.json", "lines.jsonl", "table.csv", "table.parquet", "plain.txt"]
    loaded = C.load_prompt_sources([str(tmp_path / f) for f in files], cache_dir=str(tmp_path / "cache"))
    assert loaded.column_names == ["prompt", "domain", "source"]
    rows = [(r["prompt"], r["domain"], r["source"].rsplit("/", 1)[-1]) for r in loaded]
    assert rows == [("a cat", "", "list.json"), ("a dog", "", "list.json"), ("a red circle", "shapes", "objects.json"),
                    ("a boat", "", "lines.jsonl"), ("a car", "vehicles", "lines.jsonl"),
                    ("a cup, on a table", "objects", "table.csv"), ("a tree", "", "table.parquet"),
                    ("a house", "", "table.parquet"), ("a bird", "", "plain.txt"), ("", "", "plain.txt"),
                    ("a fish", "", "plain.txt")]
    folder = C.load_prompt_sources([str(tmp_path)], cache_dir=str(tmp_path / "cache"))
    assert len(folder) == len(loaded)


@pytest.mark.parametrize("name, content, message", [
    ("missing.csv", None, "not found"),
    ("prompts.xlsx", "x", "unknown prompt file format '.xlsx'"),
    ("empty.txt", "", "is empty"),
    ("blank.txt", "\n  \n", "holds no prompts"),
    ("cols.csv", "title,domain\nx,y\n", "no prompt column (prompt/text/caption); its columns are ['title', 'domain']"),
])
def test_bad_sources_fail_naming_the_file(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(C.CurationError) as error:
        C.load_prompt_sources([str(path)], cache_dir=str(tmp_path / "cache"))
    assert message in str(error.value) and name in str(error.value) and "\n" not in str(error.value)


def test_hub_id_offline_fails_with_one_line_naming_it(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(C.CurationError) as error:
        C.load_prompt_sources(["someone/captions:validation:caption"])
    assert "'someone/captions'" in str(error.value) and "\n" not in str(error.value)


def test_normalise():
    assert C.normalise("  \"A  red\tcar\"\n") == "A red car"
    assert C.normalise("\u201cＦｕｌｌ width\u201d") == "Full width"
    assert C.normalise("'quoted'") == "quoted"
    assert C.normalise("it's a dog's life") == "it's a dog's life"
    assert C.normalise(None) == "" and C.normalise("  \"\"  ") == ""


# ------------------------------------------------------------------------------------------- curation


def test_exact_and_near_duplicates_and_long_prompts_are_dropped():
    prompts = DIVERSE + ["  A Red Fox in the SNOW ", "\"a bowl of ramen on a wooden table\"", "",
                         "a red fox in the snow!", "a very long prompt " + "word " * 30]
    selected, stats = C.curate(table(prompts), trigram_embed, word_count, max_tokens=20, n=100, near_duplicate=0.75)
    counts = stats["counts"]
    assert counts["input"] == 15 and counts["empty"] == 1
    assert counts["exact_duplicates"] == 2 and counts["too_long"] == 1 and counts["near_duplicates"] == 1
    assert sorted(selected["prompt"]) == sorted(DIVERSE)  # the first spelling is the one kept
    assert stats["examples"]["near_duplicates"][0][:2] == ["a red fox in the snow!", "a red fox in the snow"]
    assert stats["short_by"] == 90 and stats["n_selected"] == 10 and "short of the 100 requested" in stats["warnings"][0]


def test_near_duplicate_mask_keeps_first_and_compares_with_kept_rows_only():
    e = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.1], [1.0, 0.25], [0.0, 1.0]]), dim=1)
    # cos(0,1)=0.995, cos(1,2)=0.993, cos(0,2)=0.970: with threshold 0.98 row 2 survives because row 1 was dropped
    for block in (1, 2, 1024):
        keep, dup = C.near_duplicate_mask(e, 0.98, block=block)
        assert keep.tolist() == [True, False, True, True] and dup.tolist() == [-1, 0, -1, -1]


def clustered(clusters: int = 5, per: int = 8, dim: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centers = torch.nn.functional.normalize(torch.randn(clusters, dim, generator=g), dim=1) * 3
    return (centers.repeat_interleave(per, 0) + 0.05 * torch.randn(clusters * per, dim, generator=g))


def test_k_center_picks_one_point_per_cluster_first():
    points = clustered()
    for seed in range(4):
        order = C.k_center_greedy(points, 7, seed=seed)
        assert sorted(i // 8 for i in order[:5]) == [0, 1, 2, 3, 4]
        assert len(set(order)) == 7
    # and through curate, on its centred unit-norm embeddings
    names = [f"prompt {i}" for i in range(40)]
    selected, stats = C.curate(table(names), lookup_embed(dict(zip(names, points))), word_count, 10, n=5)
    assert sorted(int(p.split()[1]) // 8 for p in selected["prompt"]) == [0, 1, 2, 3, 4]
    assert stats["coverage"]["selected"]["max"] <= stats["coverage"]["random_same_size"]["max"]


def test_k_center_quotas_are_met_exactly():
    points = clustered()
    groups = [i % 3 for i in range(40)]
    order = C.k_center_greedy(points, 9, seed=1, groups=groups, quotas={0: 5, 1: 3, 2: 1})
    assert [sum(groups[i] == g for i in order) for g in range(3)] == [5, 3, 1]


@pytest.mark.parametrize("sizes, n, expected", [
    ({"a": 600, "b": 300, "c": 100}, 10, {"a": 6, "b": 3, "c": 1}),
    ({"a": 990, "b": 10}, 10, {"a": 9, "b": 1}),  # at least one each
    ({"a": 5, "b": 5, "c": 5}, 7, {"a": 3, "b": 2, "c": 2}),  # largest remainder, ties by name
    ({"a": 1, "b": 50, "c": 49}, 4, {"a": 1, "b": 2, "c": 1}),
    ({"a": 3, "b": 9, "c": 1}, 2, {"a": 1, "b": 1, "c": 0}),  # fewer slots than domains: largest first
    ({"a": 2, "b": 3}, 5, {"a": 2, "b": 3}),
])
def test_allocate_quotas(sizes, n, expected):
    assert C.allocate_quotas(sizes, n) == expected


def test_stratified_selection_follows_domain_sizes_after_dedupe():
    prompts, domains = [], []
    for domain, count in (("animals", 60), ("food", 30), ("text", 10)):
        prompts += [f"{domain} prompt number {i} {'x' * (i % 7)}" for i in range(count)]
        domains += [domain] * count
    prompts += ["animals prompt number 1 x"] * 30  # exact duplicates must not inflate a domain's share
    domains += ["food"] * 30
    selected, stats = C.curate(table(prompts, domains), trigram_embed, word_count, 50, n=20, near_duplicate=0.999)
    assert stats["domains"]["stratified"] and stats["counts"]["exact_duplicates"] == 30
    assert stats["domains"]["available"] == {"animals": 60, "food": 30, "text": 10}
    assert stats["domains"]["quota"] == stats["domains"]["selected"] == {"animals": 12, "food": 6, "text": 2}
    assert selected["order"] == list(range(20))


def test_curate_is_deterministic_given_seed():
    prompts = [f"{a} {b} on a {c}" for a in ("a red", "a blue", "two green") for b in ("cup", "ball", "cat")
               for c in ("table", "chair", "bed")]
    runs = [C.curate(table(prompts), trigram_embed, word_count, 20, n=8, seed=s)[0]["prompt"] for s in (3, 3, 4)]
    assert runs[0] == runs[1]
    assert len(set(runs[0])) == 8


def test_curate_rejects_bad_parameters():
    with pytest.raises(ValueError, match="n must be a positive"):
        C.curate(table(DIVERSE), trigram_embed, word_count, 20, n=0)
    with pytest.raises(ValueError, match="near_duplicate must be"):
        C.curate(table(DIVERSE), trigram_embed, word_count, 20, near_duplicate=1.5)


# ------------------------------------------------------------------------------------------- outputs


def test_write_slimset_digest_matches_capture(tmp_path):
    from slimdiff.compress import read_prompts

    domains = ["a", "b"] * 5
    selected, stats = C.curate(table(DIVERSE, domains), trigram_embed, word_count, 20, n=6)
    path = C.write_slimset(selected, stats, tmp_path / "out")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == selected["prompt"] and set(rows[0]) == {"prompt", "domain", "source"}
    written = json.loads((tmp_path / "out" / "slimset_stats.json").read_text())
    assert written["digest"] == prompts_digest(selected["prompt"]) == prompts_digest(read_prompts(path))
    assert written["num_prompts"] == 6 and written["counts"]["selected"] == 6
    assert (tmp_path / "out" / "slimset_domains.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["slimset.jsonl", "slimset_domains.png",
                                                                    "slimset_stats.json"]


# -------------------------------------------------------------------------------- tiny pipeline + CLI


@pytest.fixture(scope="module")
def tiny_pipe():
    from tests.helpers import tiny_sd_pipeline

    return tiny_sd_pipeline()


def test_text_embedder_and_token_counter_on_tiny_pipeline(tiny_pipe):
    embed = C.text_embedder(tiny_pipe, batch_size=3, progress=False)
    prompts = DIVERSE[:7]
    vectors = embed(prompts)
    assert vectors.shape == (7, tiny_pipe.text_encoder.config.hidden_size) and vectors.dtype == torch.float32
    torch.testing.assert_close(vectors.norm(dim=1), torch.ones(7))
    torch.testing.assert_close(embed(prompts[:2]), vectors[:2], atol=1e-5, rtol=0)  # batching and padding do not matter
    count = C.token_counter(tiny_pipe.tokenizer)
    assert count("a cat") == len("acat") + 2  # one token per character (spaces split words) + BOS/EOS
    limit = tiny_pipe.tokenizer.model_max_length
    long_prompt = "a photo of " + "very " * 20 + "long prompt"
    selected, stats = C.curate(table(prompts + [long_prompt]), embed, count, limit, n=4)
    assert stats["counts"]["too_long"] == 1 and long_prompt not in selected["prompt"] and len(selected) == 4


def test_cli_writes_slimset_and_fails_in_one_line(tmp_path, tiny_pipe, capsys):
    model = tmp_path / "model"
    tiny_pipe.tokenizer.save_pretrained(model / "tokenizer")
    tiny_pipe.text_encoder.save_pretrained(model / "text_encoder")
    source = tmp_path / "prompts.csv"
    with open(source, "w", newline="") as handle:
        csv.writer(handle).writerows([["prompt", "domain"]] + [[p, "x" if i % 2 else "y"] for i, p in enumerate(DIVERSE)])
    out = tmp_path / "slimset"
    assert C.main(["--sources", str(source), "--model", str(model), "--n", "4", "--out", str(out), "--quiet"]) == 0
    stats = json.loads((out / "slimset_stats.json").read_text())
    assert stats["n_selected"] == 4 and stats["params"]["max_tokens"] == tiny_pipe.tokenizer.model_max_length
    assert stats["digest"] == prompts_digest([json.loads(l)["prompt"] for l in (out / "slimset.jsonl").read_text().splitlines()])
    capsys.readouterr()
    for argv in (["--sources", str(tmp_path / "nope.json")], ["--sources", str(source), "--n", "0"],
                 ["--sources", str(tmp_path / "prompts.doc")]):
        assert C.main(argv + ["--model", str(model), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1
    assert C.main(["--sources", str(source), "--model", str(tmp_path), "--out", str(out)]) == 2
    assert "no tokenizer/ and text_encoder/" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ the pool


def test_general_pool_is_deterministic_unique_and_matches_the_committed_csv():
    from pathlib import Path

    from slimdiff.pipeline import prompt_pool

    rows = prompt_pool.generate_pool()
    assert rows == prompt_pool.generate_pool()
    assert len({p.casefold() for p, _ in rows}) == len(rows) == 10 * prompt_pool.DEFAULT_PER_DOMAIN
    domains = {d for _, d in rows}
    assert domains == {"people", "animals", "objects", "food", "indoor", "outdoor", "vehicles", "art_styles",
                       "text_rendering", "multi_object"}
    assert all(C.normalise(p) == p for p, _ in rows)
    assert prompt_pool.generate_pool(per_domain=5, seed=1) != prompt_pool.generate_pool(per_domain=5, seed=2)
    committed = Path(__file__).resolve().parents[1] / "data" / "prompts" / "general_pool.csv"
    with open(committed, newline="", encoding="utf-8") as handle:
        assert [(r["prompt"], r["domain"]) for r in csv.DictReader(handle)] == rows
