"""Latent classes (memory, running means), latent text embeddings and the latent vocabulary."""

import json
import logging
import os

import pytest
import torch
import torch.multiprocessing as mp
from detectron2.data import DatasetCatalog, MetadataCatalog

from c2s_d2.data.zero_shot import register_zero_shot_sem_seg
from c2s_d2.modeling.distillation.latent_classes import LatentClassMemory, RunningMean
from c2s_d2.modeling.distillation.latent_text import latent_text_embeddings
from c2s_d2.modeling.distillation.latent_vocabulary import (
    build_latent_vocabulary,
    default_latent_vocabulary,
    filter_vocabulary,
    imagenet_category_names,
    load_synonym_table,
    load_vocabulary_file,
    normalize_name,
    unseen_names_of_registered_datasets,
)

# ------------------------------------------------------------------ latent class memory


def test_memory_fills_empty_slots_then_assigns_by_cosine():
    mem = LatentClassMemory(num_classes=3, dim=2, momentum=0.5)
    assert mem.assign(torch.tensor([[1.0, 0.0]])).tolist() == [-1]  # nothing filled yet
    ids = mem.update_and_assign(torch.tensor([[2.0, 0.0], [0.0, 1.0]]))
    assert ids.tolist() == [0, 1]
    assert mem.counts.tolist() == [1, 1, 0] and not bool(mem.initialized)
    assert torch.allclose(mem.prototypes, torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))
    # Only filled slots compete: (0.6, 0.8) is nearer to e1 (0.8) than to e0 (0.6).
    assert mem.assign(torch.tensor([[0.6, 0.8], [0.8, 0.6], [-1.0, 0.1]])).tolist() == [1, 0, 1]
    mem.update_and_assign(torch.tensor([[-1.0, 0.0]]))
    assert bool(mem.initialized) and mem.counts.tolist() == [1, 1, 1]


def test_memory_ema_update_by_hand():
    mem = LatentClassMemory(num_classes=2, dim=2, momentum=0.5)
    mem.update_and_assign(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    # (1.6, 1.2) normalises to (0.8, 0.6), nearest to p0 = (1, 0):
    # p0 <- normalise(0.5 (1, 0) + 0.5 (0.8, 0.6)) = (0.9, 0.3) / 0.948683 = (0.948683, 0.316228)
    ids = mem.update_and_assign(torch.tensor([[1.6, 1.2]]))
    assert ids.tolist() == [0]
    assert torch.allclose(mem.prototypes[0], torch.tensor([0.9486833, 0.3162278]), atol=1e-6)
    assert torch.allclose(mem.prototypes[1], torch.tensor([0.0, 1.0]))
    assert mem.counts.tolist() == [2, 1]


def test_memory_ema_uses_the_mean_of_assigned_regions():
    mem = LatentClassMemory(num_classes=2, dim=2, momentum=0.5)
    mem.update_and_assign(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    # Two regions join p0: mean (0.9, 0.3); p0 <- normalise((0.95, 0.15)) = (0.987763, 0.155963)
    mem.update(torch.tensor([[0.8, 0.6], [1.0, 0.0]]), torch.tensor([0, 0]))
    assert torch.allclose(mem.prototypes[0], torch.tensor([0.9877630, 0.1559626]), atol=1e-6)
    # Negative ids are skipped; out-of-range ids are refused.
    before = mem.prototypes.clone()
    mem.update(torch.tensor([[0.0, -1.0]]), torch.tensor([-1]))
    assert torch.equal(mem.prototypes, before)
    with pytest.raises(ValueError, match="K_LATENT"):
        mem.update(torch.tensor([[0.0, -1.0]]), torch.tensor([2]))


def test_memory_is_deterministic_and_checkpointed():
    def run():
        mem = LatentClassMemory(num_classes=4, dim=8, momentum=0.9)
        g = torch.Generator().manual_seed(0)
        for step in range(6):
            mem.update_and_assign(torch.randn(step % 3 + 1, 8, generator=g))
        return mem

    a, b = run(), run()
    assert torch.equal(a.prototypes, b.prototypes) and torch.equal(a.counts, b.counts)
    assert set(a.state_dict()) == {
        "prototypes",
        "counts",
        "initialized",
        "idle_steps",
        "reseeds",
    }
    c = LatentClassMemory(num_classes=4, dim=8)
    c.load_state_dict(a.state_dict())
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(1))
    assert torch.equal(c.assign(x), a.assign(x))
    norms = a.prototypes.norm(dim=1)
    assert torch.allclose(norms, torch.ones(4), atol=1e-6)


def _distributed_worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)  # no OpenMP pool shared with the forked parent
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world
    )
    try:
        mem = LatentClassMemory(num_classes=3, dim=2, momentum=0.5)
        mean = RunningMean(2)
        local = [torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[0.6, 0.8], [-1.0, 0.0]])]
        ids = mem.update_and_assign(local[rank])
        second = [torch.tensor([[0.8, 0.6]]), torch.zeros(0, 2)]  # rank 1 has no region
        mem.update_and_assign(second[rank])
        mean.update(local[rank] * (rank + 1))
        torch.save(
            {"p": mem.prototypes, "ids": ids, "mean": mean.value, "n": mean.count},
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        torch.distributed.destroy_process_group()


def test_distributed_memory_matches_single_process(tmp_path):
    mp.start_processes(
        _distributed_worker,
        args=(2, str(tmp_path / "init"), str(tmp_path)),
        nprocs=2,
        start_method="fork",
    )
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert torch.equal(r0["p"], r1["p"])
    # Single process fed the regions in rank order gives the same prototypes.
    ref = LatentClassMemory(num_classes=3, dim=2, momentum=0.5)
    ref.update_and_assign(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [-1.0, 0.0]]))
    ref.update_and_assign(torch.tensor([[0.8, 0.6]]))
    assert torch.allclose(r0["p"], ref.prototypes)
    # Step 1 gathers (1,0), (0,1), (0.6,0.8), (-1,0): the first three fill slots 0, 1, 2 and
    # (-1,0) joins slot 1 (cosine 0 beats -1 and -0.6), which moves to (-0.707, 0.707).
    # Rank 1's regions then sit nearest to slot 2 (cosine 1) and slot 1 (cosine 0.707).
    assert r1["ids"].tolist() == [2, 1]
    # Mean of rows (1,0), (0,1), 2*(0.6,0.8), 2*(-1,0) = (0.2, 2.6) / 4 = (0.05, 0.65)
    assert torch.allclose(r0["mean"], torch.tensor([0.05, 0.65])) and int(r1["n"]) == 4
    assert torch.equal(r0["mean"], r1["mean"])


def test_running_mean_exact_and_ema():
    m = RunningMean(2)
    m.update(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    assert m.value.tolist() == [2.0, 3.0]
    m.update(torch.tensor([[5.0, 6.0]]))
    assert m.value.tolist() == [3.0, 4.0] and int(m.count) == 3  # mean of 1,3,5 and 2,4,6
    m.update(torch.zeros(0, 2))
    assert m.value.tolist() == [3.0, 4.0]
    e = RunningMean(2, momentum=0.5)
    e.update(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))  # first batch sets it: (2, 3)
    e.update(torch.tensor([[6.0, 7.0]]))  # 0.5 (2, 3) + 0.5 (6, 7) = (4, 5)
    assert e.value.tolist() == [4.0, 5.0]
    assert set(e.state_dict()) == {"value", "count"}


# ------------------------------------------------------------------ latent text embeddings


def test_latent_text_embedding_d2_by_hand():
    p = torch.tensor([[3.0, 0.0]])  # normalised to (1, 0)
    vocab = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-1.0, 0.0]])  # cosines 1, 0, -1
    zero = torch.zeros(2)
    # top-2 = entries 0, 1; tau = 1: weights softmax(1, 0) = (0.731059, 0.268941);
    # text part (0.731059, 0.268941); visual part (1, 0); lam 0.5: (0.865529, 0.134471)
    # normalised: (0.988145, 0.153521)
    z = latent_text_embeddings(p, vocab, topk=2, tau=1.0, lam=0.5, mean_image=zero, mean_text=zero)
    assert torch.allclose(z, torch.tensor([[0.9881454, 0.1535207]]), atol=1e-6)
    # Modality-gap shift: visual part (1, 0) - (0.5, 0) + (0, 0.5) = (0.5, 0.5);
    # lam 0.5: (0.615529, 0.384471), normalised (0.848144, 0.529766)
    z = latent_text_embeddings(
        p,
        vocab,
        2,
        1.0,
        0.5,
        mean_image=torch.tensor([0.5, 0.0]),
        mean_text=torch.tensor([0.0, 0.5]),
    )
    assert torch.allclose(z, torch.tensor([[0.8481439, 0.5297660]]), atol=1e-6)
    # lam = 1 and top-1: the nearest vocabulary entry itself.
    z = latent_text_embeddings(p, vocab, 1, 1.0, 1.0, zero, zero)
    assert torch.allclose(z, torch.tensor([[1.0, 0.0]]))


def test_latent_text_embedding_d3_by_hand():
    p = torch.tensor([[3.0, 1.0, 0.0]])  # (0.948683, 0.316228, 0)
    vocab = torch.tensor([[2.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 1.0]])
    zero = torch.zeros(3)
    # cosines (0.948683, 0.316228, 0); top-2, tau 0.5: softmax(1.897367, 0.632456)
    # = (0.779870, 0.220130); lam 0.25: 0.25 (0.779870, 0.220130, 0) + 0.75 (0.948683, 0.316228, 0)
    # = (0.906480, 0.292203, 0), normalised (0.951773, 0.306803, 0)
    z = latent_text_embeddings(p, vocab, topk=2, tau=0.5, lam=0.25, mean_image=zero, mean_text=zero)
    assert torch.allclose(z, torch.tensor([[0.9517729, 0.3068034, 0.0]]), atol=1e-6)
    # topk larger than V is clipped to V; the third entry has weight exp(0)/... > 0 now.
    z_all = latent_text_embeddings(
        p, vocab, topk=10, tau=0.5, lam=1.0, mean_image=zero, mean_text=zero
    )
    assert z_all[0, 2] > 0


def test_latent_text_embedding_without_vocabulary():
    p = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    mi, mt = torch.tensor([0.5, 0.0]), torch.tensor([0.0, 0.5])
    # (1, 0) - (0.5, 0) + (0, 0.5) = (0.5, 0.5) -> (0.707107, 0.707107); (0, 1) -> (-0.5, 1.5)
    z = latent_text_embeddings(p, torch.zeros(0, 2), 5, 0.07, 0.5, mi, mt)
    expected = torch.tensor([[0.7071068, 0.7071068], [-0.3162278, 0.9486833]])
    assert torch.allclose(z, expected, atol=1e-6)
    with pytest.raises(ValueError, match="TAU"):
        latent_text_embeddings(p, torch.ones(1, 2), 5, 0.0, 0.5, mi, mt)
    with pytest.raises(ValueError, match="vocab_text"):
        latent_text_embeddings(p, torch.ones(1, 3), 5, 0.07, 0.5, mi, mt)


# ------------------------------------------------------------------ latent vocabulary

COCO_STUFF_UNSEEN = [
    "cow", "giraffe", "suitcase", "frisbee", "skateboard", "carrot", "scissors", "cardboard",
    "clouds", "grass", "playingfield", "river", "road", "tree", "wall-concrete",
]  # fmt: skip
VOC_UNSEEN = ["pottedplant", "sheep", "sofa", "train", "tvmonitor"]
CONTEXT_UNSEEN = [
    "cow", "motorbike", "sofa", "cat", "boat", "fence", "bird", "tvmonitor", "keyboard",
    "aeroplane",
]  # fmt: skip
ALL_UNSEEN = sorted(set(COCO_STUFF_UNSEEN + VOC_UNSEEN + CONTEXT_UNSEEN))


def _contains_words(name, term):
    words, t = normalize_name(name), "".join(normalize_name(term))
    return any(
        "".join(words[i:j]) == t for i in range(len(words)) for j in range(i + 1, len(words) + 1)
    )


def test_normalize_name():
    assert normalize_name("TV-Monitors") == ("tv", "monitor")
    assert normalize_name("jack-o'-lantern") == ("jack", "o", "lantern")
    assert normalize_name("clouds") == ("cloud",) and normalize_name("grass") == ("grass",)


def test_synonym_table_covers_benchmarks_and_names_real_imagenet_classes():
    table = load_synonym_table()
    assert set(ALL_UNSEEN) <= set(table)
    imagenet = {"".join(normalize_name(n)) for n in imagenet_category_names()}
    typos = [
        h
        for e in table.values()
        for h in e["hyponyms"]
        if "".join(normalize_name(h)) not in imagenet
    ]
    assert typos == []


@pytest.mark.parametrize("unseen", [COCO_STUFF_UNSEEN, VOC_UNSEEN, CONTEXT_UNSEEN, ALL_UNSEEN])
def test_no_unseen_name_or_synonym_survives(unseen):
    names, removed = default_latent_vocabulary(unseen)
    assert len(names) + len(removed) == 1000 and len(removed) > 0
    table = load_synonym_table()
    for u in unseen:
        terms = [u, *table[u]["synonyms"]]
        for name in names:
            assert not any(_contains_words(name, t) for t in terms), (u, name)
        hyponyms = {"".join(normalize_name(h)) for h in table[u]["hyponyms"]}
        assert not hyponyms & {"".join(normalize_name(n)) for n in names}, u


def test_vocabulary_removals_by_hand():
    names, removed = default_latent_vocabulary(ALL_UNSEEN)
    for gone in [
        "tabby", "Persian cat", "hummingbird", "goose", "albatross", "speedboat", "submarine",
        "studio couch", "television", "monitor", "ox", "ram", "moped", "airliner", "warplane",
        "computer keyboard", "picket fence", "bullet train", "steam locomotive", "pot", "tree frog",
    ]:  # fmt: skip
        assert gone in removed and gone not in names, gone
    # Unrelated names stay ("beagle" ends with "eagle" but is not a compound of it).
    for kept in [
        "tench",
        "goldfish",
        "beagle",
        "wall clock",
        "window screen",
        "sunscreen",
        "pizza",
    ]:
        assert kept in names, kept
    assert names == sorted(names, key=imagenet_category_names().index)  # stable order
    assert default_latent_vocabulary([]) == (imagenet_category_names(), [])


def test_removal_count_is_logged(caplog):
    with caplog.at_level(logging.INFO, logger="c2s_d2.modeling.distillation.latent_vocabulary"):
        _, removed = default_latent_vocabulary(VOC_UNSEEN)
    assert f"removed {len(removed)} of 1000" in caplog.text


def test_filter_rules_on_a_custom_vocabulary():
    table = {"boat": {"synonyms": ("ship",), "hyponyms": ("canoe",)}}
    vocab = [
        "speedboat",
        "Boats",
        "tv monitor",
        "canoe",
        "airship",
        "shipyard",
        "boat-house",
        "goat",
    ]
    kept, removed = filter_vocabulary(vocab, ["boat", "tvmonitor"], synonym_table=table)
    # "airship" ends with "ship" after 3+ letters; "shipyard" starts with it: kept.
    assert removed == ["speedboat", "Boats", "tv monitor", "canoe", "airship", "boat-house"]
    assert kept == ["shipyard", "goat"]


def test_vocabulary_files(tmp_path):
    f = tmp_path / "vocab.txt"
    f.write_text("# generic names\nsheep\n\nlamp\nlamp\ncloud\n")
    assert load_vocabulary_file(str(f)) == ["sheep", "lamp", "cloud"]
    assert build_latent_vocabulary(str(f), ["sheep", "clouds"]) == (["lamp"], ["sheep", "cloud"])
    assert build_latent_vocabulary("", ["sheep"]) == ([], [])
    assert len(build_latent_vocabulary("imagenet", [])[0]) == 1000
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        load_vocabulary_file(str(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(ValueError, match="empty.txt"):
        load_vocabulary_file(str(tmp_path / "empty.txt"))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"entries": {"cow": {"synonym": ["ox"]}}}))
    with pytest.raises(ValueError, match="bad.json"):
        load_synonym_table(str(bad))


def test_unseen_names_of_registered_datasets():
    names = ["c2s_test_latent_vocab_eval", "c2s_test_latent_vocab_train"]
    before = set(unseen_names_of_registered_datasets())  # other tests may have registered some
    classes = ["sky", "zebra crossing", "tvmonitor"]
    text = [["sky"], ["zebra crossing", "crosswalk"], ["tv monitor", "television"]]
    for name, split in zip(names, ["eval", "train"]):
        register_zero_shot_sem_seg(
            name,
            load_records=list,
            class_names=classes,
            unseen_ids=[1, 2],
            split=split,
            text_names=text,
        )
    try:
        found = unseen_names_of_registered_datasets()
        for n in ["zebra crossing", "crosswalk", "tvmonitor", "tv monitor", "television"]:
            assert n in found
        assert "sky" not in set(found) - before  # a seen class of ours is never listed
        assert "television" in default_latent_vocabulary(found)[1]
    finally:
        for name in names:
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
