"""Training data: the bundled sample joined with a real (tiny) embedding store; policies; sharding; resume."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, CLIPImageProcessor

from olacache.inputs.annotations import load_annotations, unique_images
from olacache.store import FAILED, OK, EmbeddingStore, TargetReader
from olatrain.config import Config
from olatrain.data import (
    ConversationDataset,
    DataError,
    StepBatchSampler,
    build_dataloader,
    check_targets,
    collate,
    pad_to_square,
    processor_mean_color,
)
from olatrain.data.templates import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from olatrain.presets import tiny_tokenizer_dir, tiny_vision_dir

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "examples" / "sample.json"
IMAGES = ROOT / "examples" / "images"
SHAPES = {"gen": (1, 8), "depth": (4, 6)}
SIGN = {"gen": 1.0, "depth": -1.0}


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir())


@pytest.fixture(scope="module")
def proc():
    return CLIPImageProcessor.from_pretrained(tiny_vision_dir())


@pytest.fixture(scope="module")
def paths() -> list[str]:
    return unique_images(load_annotations(SAMPLE))


def value(teacher: str, row: int) -> float:
    """Every row of the test store holds one constant: its row number (+1), signed per teacher."""
    return SIGN[teacher] * (row + 1)


def make_store(tmp_path: Path, paths: list[str], *, failed: dict[str, set[str]] | None = None,
               unwritten: dict[str, set[int]] | None = None, teachers=("gen", "depth"), rows=None) -> str:
    url = str(tmp_path / "store.zarr")
    rows = list(paths) if rows is None else rows
    st = EmbeddingStore.create(url, rows, shard_size=8)
    for t in teachers:
        st.add_teacher(t, SHAPES[t], attrs={"weights": "random_init"})
        for shard in range(st.n_shards):
            if shard in (unwritten or {}).get(t, set()):
                continue  # left MISSING, as after an interrupted build
            r = st.shard_rows(shard)
            vals = np.stack([np.full(SHAPES[t], value(t, i), np.float32) for i in r])
            bad = (failed or {}).get(t, set())
            status = np.array([FAILED if rows[i] in bad else OK for i in r], np.uint8)
            errs = ["decode error" if rows[i] in bad else "" for i in r]
            st.write_shard(t, shard, vals, status, errs)
    st.close()
    return url


def make_cfg(**data) -> Config:
    cfg = Config()
    cfg.data.annotations = str(SAMPLE)
    cfg.data.image_root = str(IMAGES)
    cfg.model.chat_template = "llama3"
    for k, v in data.items():
        setattr(cfg.data, k, v)
    return cfg


def dataset(cfg, tok, proc, reader, teachers=("gen", "depth"), **kw) -> ConversationDataset:
    return ConversationDataset(cfg, tok, proc, reader, list(teachers), **kw)


# ----------------------------------------------------------------------------------------------- the join


def test_batch_join_and_layout(tmp_path, tok, proc, paths):
    url = make_store(tmp_path, paths, failed={"depth": {"horse_1bit.png"}})
    reader = TargetReader(url, ["gen", "depth"])
    ds = dataset(make_cfg(), tok, proc, reader)
    assert len(ds) == 27
    batch = collate(ds.__getitems__(list(range(len(ds)))), ds.pad_id)
    b, seq = batch["input_ids"].shape
    assert b == 27 and batch["labels"].shape == (b, seq) and batch["attention_mask"].shape == (b, seq)
    assert batch["pixel_values"].shape == (b, 3, 336, 336) and batch["pixel_values"].dtype == torch.float32
    row_of = {p: i for i, p in enumerate(paths)}
    for i in range(b):
        sid, key = batch["ids"][i], batch["image_paths"][i]
        n = int(batch["attention_mask"][i].sum())
        ids, labels = batch["input_ids"][i], batch["labels"][i]
        assert (batch["attention_mask"][i, :n] == 1).all() and (batch["attention_mask"][i, n:] == 0).all()
        assert (ids[n:] == tok.pad_token_id).all() and (labels[n:] == IGNORE_INDEX).all()
        assert (labels[:n] != IGNORE_INDEX).any()
        has = bool(batch["has_image"][i])
        assert int((ids == IMAGE_TOKEN_INDEX).sum()) == int(has)
        if sid == "txt-000":
            assert not has and key is None
            assert (batch["pixel_values"][i] == 0).all()
            for t in SHAPES:
                assert not batch["target_mask"][t][i] and (batch["targets"][t][i] == 0).all()
            continue
        assert has and key in row_of  # normalised: "./chelsea.jpg" joined as "chelsea.jpg"
        for t in SHAPES:
            tgt = batch["targets"][t][i]
            assert tgt.dtype == torch.float16 and tgt.shape == SHAPES[t]
            ok = not (t == "depth" and key == "horse_1bit.png")
            assert bool(batch["target_mask"][t][i]) == ok
            want = value(t, row_of[key]) if ok else 0.0
            assert (tgt == want).all(), (sid, key, t)
    assert batch["image_paths"][batch["ids"].index("mt-000")] == "chelsea.jpg"
    # the duplicate id is kept: two samples called cap-001, both joined to chelsea.jpg
    assert [batch["image_paths"][i] for i, s in enumerate(batch["ids"]) if s == "cap-001"] == ["chelsea.jpg"] * 2


def test_single_item_matches_batch(tmp_path, tok, proc, paths):
    reader = TargetReader(make_store(tmp_path, paths), ["gen", "depth"])
    ds = dataset(make_cfg(), tok, proc, reader)
    one = collate([ds[3], ds[0]], ds.pad_id)
    two = collate(ds.__getitems__([3, 0]), ds.pad_id)
    for k in ("input_ids", "labels", "attention_mask", "pixel_values", "has_image"):
        assert torch.equal(one[k], two[k]), k
    for t in SHAPES:
        assert torch.equal(one["targets"][t], two["targets"][t])
        assert torch.equal(one["target_mask"][t], two["target_mask"][t])


def test_no_reader_no_targets(tok, proc):
    ds = dataset(make_cfg(), tok, proc, None)
    batch = collate(ds.__getitems__([0, 1]), ds.pad_id)
    assert batch["targets"] == {} and batch["target_mask"] == {}
    # no teachers to check (VPT/IFT): nothing is dropped
    no_t = dataset(make_cfg(), tok, proc, None, teachers=())
    assert check_targets(no_t, None, make_cfg())["skipped"] == 0 and len(no_t) == 27


def test_square_vs_pad(tok, proc):
    sq = dataset(make_cfg(image_aspect="square"), tok, proc, None)
    pd = dataset(make_cfg(image_aspect="pad"), tok, proc, None)
    i = [sq.sample(k)["id"] for k in range(len(sq))].index("cap-019")  # strip_400x6.jpg
    a, b = sq[i]["pixel_values"], pd[i]["pixel_values"]
    assert a.shape == b.shape == (3, 336, 336)
    # pad: the band above the strip is the processor's mean colour, int(255*m), i.e. ~0 after normalising
    mean, std = np.array(proc.image_mean), np.array(proc.image_std)
    fill = (np.array(processor_mean_color(proc)) / 255.0 - mean) / std
    assert np.allclose(b[:, :100, :].mean(dim=(1, 2)).numpy(), fill, atol=2e-2)
    assert np.allclose(b[:, 0, 0].numpy(), fill, atol=2e-2)
    # square: shortest side to 336 and centre crop -> no padding band, the whole crop is strip content
    assert not np.allclose(a[:, 0, 0].numpy(), fill, atol=2e-2) or a[:, :100].std() > 0.05
    assert processor_mean_color(proc) == (122, 116, 104)


def test_pad_to_square_offsets():
    from PIL import Image

    im = Image.new("RGB", (4, 2), (255, 0, 0))
    out = pad_to_square(im, (1, 2, 3))
    a = np.asarray(out)
    assert out.size == (4, 4)
    assert a[0, 0].tolist() == [1, 2, 3] and a[1, 0].tolist() == [255, 0, 0] and a[3, 0].tolist() == [1, 2, 3]
    assert pad_to_square(Image.new("RGB", (3, 3)), (0, 0, 0)).size == (3, 3)


def test_truncation_budget(tok, proc):
    cfg = make_cfg(max_length=70)
    cfg.model.image_tokens = 4
    cfg.model.task_tokens = {"gen": 1, "depth": 1, "seg": 1}
    ds = dataset(cfg, tok, proc, None)
    assert ds.image_block == 7
    full = dataset(make_cfg(), tok, proc, None)
    for i in (0, 1, 21, 22, 25):  # captions, multi-turn (truncated), text-only
        it, ref = ds[i], full[i]
        n = len(it["input_ids"])
        if it["has_image"]:
            assert n - 1 + 7 <= 70  # what the model will see after inserting image + task tokens
            assert n == min(len(ref["input_ids"]), 64)
        else:
            assert n == min(len(ref["input_ids"]), 70)
        assert torch.equal(it["input_ids"], ref["input_ids"][:n]) and torch.equal(it["labels"], ref["labels"][:n])
    cfg.data.max_length = 40  # the image placeholder itself no longer fits after the system prompt
    small = dataset(cfg, tok, proc, None)
    with pytest.raises(DataError, match="image placeholder sits at token"):
        small[0]
    cfg.data.max_length = 7
    with pytest.raises(DataError, match="cannot hold an image"):
        dataset(cfg, tok, proc, None)


def test_directory_is_not_training_data(tok, proc):
    cfg = make_cfg()
    cfg.data.annotations = str(IMAGES)
    with pytest.raises(DataError, match="has no conversation"):
        dataset(cfg, tok, proc, None)


def test_pickles(tmp_path, tok, proc, paths):
    reader = TargetReader(make_store(tmp_path, paths), ["gen", "depth"])
    ds = dataset(make_cfg(), tok, proc, reader)
    ds2 = pickle.loads(pickle.dumps(ds))
    a, b = collate(ds.__getitems__([5, 26]), ds.pad_id), collate(ds2.__getitems__([5, 26]), ds2.pad_id)
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["targets"]["depth"], b["targets"]["depth"])


# ----------------------------------------------------------------------------------------------- policies


def test_check_targets_all_ok(tmp_path, tok, proc, paths):
    reader = TargetReader(make_store(tmp_path, paths), ["gen", "depth"])
    ds = dataset(make_cfg(), tok, proc, reader)
    rep = check_targets(ds, reader, make_cfg())
    assert rep["skipped"] == 0 and rep["kept"] == 27 and rep["coverage"] == 1.0 and len(ds) == 27


def test_check_targets_skip(tmp_path, tok, proc, paths):
    # chelsea.jpg is used by 3 samples (cap-001 twice, mt-000 as ./chelsea.jpg); depth failed there,
    # and gen's shard 0 was never written (8 images missing)
    url = make_store(tmp_path, paths, failed={"depth": {"chelsea.jpg"}}, unwritten={"gen": {0}})
    reader = TargetReader(url, ["gen", "depth"])
    cfg = make_cfg(missing_targets="skip", min_store_coverage=0.5)
    ds = dataset(cfg, tok, proc, reader)
    missing = set(paths[:8]) | {"chelsea.jpg"}
    samples = load_annotations(SAMPLE)
    from olacache.store import normalize_image_path

    n_bad = sum(1 for s in samples if "image" in s and normalize_image_path(s["image"]) in missing)
    rep = check_targets(ds, reader, cfg)
    assert rep["skipped"] == n_bad and len(ds) == 27 - n_bad and rep["kept"] == len(ds)
    assert rep["usable_images"] == len(paths) - len(missing)
    kept_keys = {ds.image_key(i) for i in range(len(ds))}
    assert not (kept_keys & missing) and None in kept_keys  # text-only sample kept
    batch = collate(ds.__getitems__(list(range(len(ds)))), ds.pad_id)
    assert all(bool(batch["target_mask"][t][i]) == bool(batch["has_image"][i]) for t in SHAPES for i in range(len(ds)))
    # idempotent: a second check starts from all samples again
    assert check_targets(ds, reader, cfg)["skipped"] == n_bad and len(ds) == 27 - n_bad


def test_check_targets_error_policy(tmp_path, tok, proc, paths):
    reader = TargetReader(make_store(tmp_path, paths, failed={"gen": {"coffee.jpg"}}), ["gen", "depth"])
    cfg = make_cfg(missing_targets="error")
    ds = dataset(cfg, tok, proc, reader)
    with pytest.raises(DataError, match=r"2 image sample\(s\).*'cap-002' \(coffee.jpg\), 'mt-001' \(coffee.jpg\).*1 failed") as ei:
        check_targets(ds, reader, cfg)
    assert "missing_targets=skip" in str(ei.value)


def test_check_targets_coverage_refusal(tmp_path, tok, proc, paths):
    url = make_store(tmp_path, paths, unwritten={"depth": {0, 1}})  # 16 of 21 images not computed yet
    reader = TargetReader(url, ["gen", "depth"])
    cfg = make_cfg(missing_targets="skip", min_store_coverage=0.5)
    ds = dataset(cfg, tok, proc, reader)
    with pytest.raises(DataError, match=r"covers only 23.8% of the 21 images.*depth: 23.8% ok \(0 not in store, "
                                        r"16 not computed yet, 0 failed\).*e\.g\. '"):
        check_targets(ds, reader, cfg)
    # a store over a different image set: the dataset's images that are not rows count as not in the store
    url2 = make_store(tmp_path / "other", paths, rows=paths[:5] + ["zzz/other.jpg"])
    r2 = TargetReader(url2, ["gen", "depth"])
    with pytest.raises(DataError, match=r"16 not in store"):
        check_targets(dataset(cfg, tok, proc, r2), r2, cfg)


def test_check_targets_teacher_absent(tmp_path, tok, proc, paths):
    url = make_store(tmp_path, paths, teachers=("gen",))
    reader = TargetReader(url, ["gen"])
    ds = dataset(make_cfg(), tok, proc, reader, teachers=("gen", "depth"))
    with pytest.raises(DataError, match=r"no column for teacher\(s\) \['depth'\]"):
        check_targets(ds, reader, make_cfg())


# ----------------------------------------------------------------------------------------------- sampling


def test_sharding_disjoint_union_and_order():
    n, b, w = 27, 2, 3
    single = StepBatchSampler(n, b * w, seed=7)
    ranks = [StepBatchSampler(n, b, seed=7, rank=r, world_size=w) for r in range(w)]
    assert single.steps_per_epoch == ranks[0].steps_per_epoch == 4
    seen: list[int] = []
    for step in range(8):  # two epochs
        parts = [s.indices(step) for s in ranks]
        flat = [i for p in parts for i in p]
        assert all(len(p) == b for p in parts) and len(set(flat)) == b * w  # disjoint
        assert flat == list(single.indices(step))  # union, in rank order, = the single-process batch
        assert parts[0].epoch == step // 4 and parts[0].step == step
        if step < 4:
            seen += flat
    assert len(set(seen)) == 24  # epoch 0: no repeats; 27 % 6 = 3 dropped
    e0, e1 = single.permutation(0), single.permutation(1)
    assert sorted(e0) == list(range(n)) and not np.array_equal(e0, e1)
    assert np.array_equal(e0, StepBatchSampler(n, 6, seed=7).permutation(0))  # deterministic
    assert not np.array_equal(e0, StepBatchSampler(n, 6, seed=8).permutation(0))
    assert list(StepBatchSampler(n, 4, shuffle=False).indices(1)) == [4, 5, 6, 7]


def test_no_drop_last_stream():
    s = StepBatchSampler(10, 4, seed=1, drop_last=False)
    stream = [i for step in range(5) for i in s.indices(step)]  # 20 = two full epochs
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:]) == list(range(10))
    assert s.indices(2).epoch == 0 and s.indices(3).epoch == 1  # step 2 straddles epochs 0 and 1
    with pytest.raises(DataError, match="cannot fill one global batch"):
        StepBatchSampler(5, 3, world_size=2)


def test_resume_skips_without_loading():
    fresh = StepBatchSampler(27, 2, seed=3, rank=1, world_size=2)
    resumed = StepBatchSampler(27, 2, seed=3, rank=1, world_size=2, start_step=9)
    it_f, it_r = iter(fresh), iter(resumed)
    ref = [next(it_f) for _ in range(12)]
    assert [next(it_r) for _ in range(3)] == ref[9:12]


def test_dataloader_workers_resume_and_ranks(tmp_path, tok, proc, paths):
    reader = TargetReader(make_store(tmp_path, paths), ["gen", "depth"])
    cfg = make_cfg()
    ds = dataset(cfg, tok, proc, reader)
    check_targets(ds, reader, cfg)  # opens the store in this process before workers fork
    kw = dict(shuffle=True, seed=42, drop_last=True)
    l0 = build_dataloader(ds, 4, rank=0, world_size=1, num_workers=0, **kw)
    it = iter(l0)
    ref = [next(it) for _ in range(8)]  # 27 // 4 = 6 steps per epoch: crosses into epoch 1
    assert [b["step"] for b in ref] == list(range(8)) and [b["epoch"] for b in ref] == [0] * 6 + [1, 1]
    # workers (fork, persistent) + resume at step 5: the same batches, targets read inside the workers
    l2 = build_dataloader(ds, 4, rank=0, world_size=1, num_workers=2, start_step=5, **kw)
    it2 = iter(l2)
    got = [next(it2) for _ in range(3)]
    for a, b in zip(got, ref[5:], strict=True):
        assert a["ids"] == b["ids"] and a["step"] == b["step"]
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["pixel_values"], b["pixel_values"])
        assert torch.equal(a["targets"]["depth"], b["targets"]["depth"])
    del it2, l2
    # two ranks of 2 = the single process of 4, step by step
    r0 = iter(build_dataloader(ds, 2, rank=0, world_size=2, num_workers=0, **kw))
    r1 = iter(build_dataloader(ds, 2, rank=1, world_size=2, num_workers=0, **kw))
    for step in range(3):
        a, b = next(r0), next(r1)
        assert a["ids"] + b["ids"] == ref[step]["ids"]
        assert torch.equal(torch.cat([a["targets"]["gen"], b["targets"]["gen"]]), ref[step]["targets"]["gen"])


@pytest.mark.slow
def test_dataloader_spawn_context(tmp_path, tok, proc, paths):
    reader = TargetReader(make_store(tmp_path, paths), ["gen", "depth"])
    ds = dataset(make_cfg(), tok, proc, reader)
    ref = next(iter(build_dataloader(ds, 3, shuffle=True, seed=0, rank=0, world_size=1, num_workers=0)))
    ld = build_dataloader(ds, 3, shuffle=True, seed=0, rank=0, world_size=1, num_workers=1,
                          multiprocessing_context="spawn")
    got = next(iter(ld))
    assert got["ids"] == ref["ids"] and torch.equal(got["targets"]["gen"], ref["targets"]["gen"])


def test_store_readahead_reads_the_next_batches_early(tmp_path, tok, proc, paths):
    """data.store_readahead: each batch's targets (and the next N batches') are read in the background before
    the batch is made; batches equal those without read-ahead, also with 2 workers (fork) guessing their
    next steps from the round robin."""
    url = make_store(tmp_path, paths)
    cfg = make_cfg()
    kw = dict(shuffle=True, seed=3, drop_last=True, rank=0, world_size=1)
    plain_reader = TargetReader(url, ["gen", "depth"], readahead=0)
    assert plain_reader.readahead == 0 and TargetReader(url).readahead == 0  # off by default for a local store
    it = iter(build_dataloader(dataset(cfg, tok, proc, plain_reader), 4, num_workers=0, **kw))
    ref = [next(it) for _ in range(7)]
    assert plain_reader.readahead_stats == {"started": 0, "used": 0, "direct": 7}

    ahead = TargetReader(url, ["gen", "depth"], readahead=2)
    it = iter(build_dataloader(dataset(cfg, tok, proc, ahead), 4, num_workers=0, **kw))
    got = [next(it) for _ in range(7)]
    # batch s started s, s+1, s+2 (the first) or only s+2 (the others): every read was started ahead
    assert ahead.readahead_stats == {"started": 7 + 2, "used": 7, "direct": 0}
    it2 = iter(build_dataloader(dataset(cfg, tok, proc, ahead), 4, num_workers=2, **kw))
    got2 = [next(it2) for _ in range(7)]
    for a, b, c in zip(ref, got, got2, strict=True):
        assert a["ids"] == b["ids"] == c["ids"]
        for t in ("gen", "depth"):
            assert torch.equal(a["targets"][t], b["targets"][t]) and torch.equal(a["targets"][t], c["targets"][t])
            assert torch.equal(a["target_mask"][t], b["target_mask"][t])
    del it2
