"""Tensor parallelism at tp 2 (two gloo ranks on the CPU) against one process, on the same checkpoint.

Both ranks run tests/parallel/tp_cases.py once (one spawn for the module); one process runs the same cases at tp 1.
Logits within 1e-5 relative error, identical greedy tokens, a training step's loss and every gradient (each rank's
piece of the single-process gradient), for 2 KV heads (split) with the vision tower data-parallel over an odd
number of images, and 1 KV head (replicated) with the vision tower split over the ranks.
"""

import pytest
import torch
from safetensors.torch import load_file

import qvl
from qvl.parallel import rank_bytes, rank_slice
from qvl.parallel.launch import run_workers
from qvl.parallel.vision import image_runs
from tests.ops.compare import rel_err
from tests.parallel import tp_cases

TP = 2


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{config: (the tp-1 figures, [each rank's figures])}."""
    checkpoint, results = tmp_path_factory.mktemp("checkpoints"), tmp_path_factory.mktemp("results")
    for name, cfg in tp_cases.CONFIGS.items():
        qvl.save_pretrained(tp_cases.perturbed(cfg), checkpoint / name)
    run_workers(TP, tp_cases.rank_worker, (str(checkpoint), str(results)))
    out = {}
    for name, cfg in tp_cases.CONFIGS.items():
        reference = tp_cases.run_cases(qvl.from_pretrained(checkpoint / name))
        drawn = qvl.from_config(cfg, seed=3)
        reference.update({f"from_config/{k}": v.detach() for k, v in drawn.named_parameters()})
        ranks = [load_file(results / f"{name}.rank{r}.safetensors") for r in range(TP)]
        out[name] = (reference, ranks)
    return out


CONFIG_NAMES = list(tp_cases.CONFIGS)


FIGURES = ["logits/text", "logits/images", "logits/video", "logits/continued", "features/images", "attentions/text"]


@pytest.mark.parametrize(("config", "figure"), [(config, figure) for config in CONFIG_NAMES for figure in FIGURES]
                         + [("kv1", "logits/text-triton")])
def test_every_rank_computes_what_one_process_does(runs, config, figure):
    reference, ranks = runs[config]
    for rank in ranks:
        assert rank[figure].shape == reference[figure].shape
        assert rel_err(rank[figure], reference[figure]) <= 1e-5


@pytest.mark.parametrize("config", CONFIG_NAMES)
@pytest.mark.parametrize("figure", ["tokens/greedy", "tokens/video", "tokens/beams"])
def test_greedy_tokens_equal_one_process(runs, config, figure):
    reference, ranks = runs[config]
    new = reference[figure][:, -tp_cases.NEW_TOKENS:]
    assert len(set(new.flatten().tolist())) > 1, "degenerate generation proves little"
    for rank in ranks:
        assert rank[figure].tolist() == reference[figure].tolist()


@pytest.mark.parametrize("config", CONFIG_NAMES)
def test_the_graph_path_replays_one_process_tokens(runs, config):
    """generate(cuda_graph=True) twice with the CPU stand-in for capture and replay: the vision tower
    (data-parallel or split), the prefill and the decode step in its device-length form captured once each, with
    their collectives inside, replayed by the second call; the tokens are one process's greedy ones."""
    reference, ranks = runs[config]
    assert reference["tokens/graphed"].tolist() == reference["tokens/greedy"].tolist()
    for rank in ranks:
        assert rank["tokens/graphed"].tolist() == reference["tokens/greedy"].tolist()
        assert int(rank["graph_captures"]) == int(reference["graph_captures"]) == 3  # a tower, a prefill, a step


def test_ranks_sample_the_same_tokens_without_a_seed(runs):
    for _, ranks in runs.values():
        assert ranks[0]["tokens/sampled"].tolist() == ranks[1]["tokens/sampled"].tolist()


@pytest.mark.parametrize("config", CONFIG_NAMES)
@pytest.mark.parametrize("prefix", ["grad", "checkpointed_grad"])
def test_a_training_step_gives_each_rank_its_piece_of_every_gradient(runs, config, prefix):
    """With and without gradient checkpointing; the vision tower's gradients whole on every rank."""
    reference, ranks = runs[config]
    cfg = tp_cases.CONFIGS[config]
    names = [k.removeprefix("param/") for k in reference if k.startswith("param/")]
    assert any(name.startswith("visual.") for name in names) and "model.embed_tokens.weight" in names
    for r, rank in enumerate(ranks):
        assert rel_err(rank[f"{prefix}/loss"], reference["grad/loss"]) <= 1e-6
        for name in names:
            expected = rank_slice(name, reference[f"grad/{name}"], cfg, TP, r, tp_cases.VISION[config])
            assert rank[f"{prefix}/{name}"].shape == expected.shape, name
            assert rel_err(rank[f"{prefix}/{name}"], expected) <= 1e-5, name


@pytest.mark.parametrize("config", CONFIG_NAMES)
@pytest.mark.parametrize("source", ["param", "from_config"])
def test_each_rank_holds_its_piece_of_the_same_weights(runs, config, source):
    """from_pretrained reads each rank's rows and columns of the checkpoint; from_config draws the weights tp 1
    draws and keeps the rank's piece."""
    reference, ranks = runs[config]
    cfg = tp_cases.CONFIGS[config]
    names = [k.removeprefix(f"{source}/") for k in reference if k.startswith(f"{source}/")]
    for r, rank in enumerate(ranks):
        assert sorted(k.removeprefix(f"{source}/") for k in rank if k.startswith(f"{source}/")) == sorted(names)
        for name in names:
            expected = rank_slice(name, reference[f"{source}/{name}"], cfg, TP, r, tp_cases.VISION[config])
            assert torch.equal(rank[f"{source}/{name}"], expected)


@pytest.mark.parametrize("config", CONFIG_NAMES)
def test_each_rank_holds_about_half_of_what_is_split(runs, config):
    reference, ranks = runs[config]
    cfg, vision = tp_cases.CONFIGS[config], tp_cases.VISION[config]

    def held(figures, tower):
        return sum(t.numel() * t.element_size() for k, t in figures.items()
                   if k.startswith("param/") and k.startswith("param/visual.") == (tower == "vision"))

    for tower in ("decoder", "vision"):
        whole = held(reference, tower)
        for r, rank in enumerate(ranks):
            assert held(rank, tower) == rank_bytes(cfg, torch.float32, TP, r, tower=tower, vision=vision)
            if tower == "decoder":  # half, plus the norms (and the one KV head both ranks hold at kv1)
                assert whole / 2 < held(rank, tower) <= 0.56 * whole
            elif vision == "data":
                assert held(rank, tower) == whole  # the tower whole on every rank
            else:  # the blocks halved; the patch embedding and merger (most of the tiny tower) whole
                assert whole / 2 < held(rank, tower) < whole


def test_a_degree_that_cannot_split_the_model_is_refused_before_any_group_starts():
    with pytest.raises(qvl.ConfigError, match="tp 3 cannot split num_attention_heads 4"):
        qvl.from_config("tiny", tp=3)


def test_tp_above_one_outside_a_group_says_how_to_start_one(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(qvl.ConfigError, match="torchrun --nproc-per-node 2"):
        qvl.from_config("tiny", tp=2)


@pytest.mark.parametrize(("patches", "tp", "runs"), [
    ([24, 24, 16], 2, [(0, 1), (1, 3)]),  # an odd count: 24 and 40 patches (the other cut would give 48 and 16)
    ([16, 16, 16, 16], 2, [(0, 2), (2, 4)]),
    ([100, 4, 4], 2, [(0, 1), (1, 3)]),  # one large image: a rank to itself
    ([16], 2, [(0, 0), (0, 1)]),  # fewer images than ranks: a rank encodes none
    ([8, 8, 8], 4, [(0, 1), (1, 1), (1, 2), (2, 3)]),
])
def test_images_split_into_contiguous_runs_balanced_by_patches(patches, tp, runs):
    assert image_runs(patches, tp) == runs


def test_a_rank_refuses_to_save_its_piece_as_a_whole_checkpoint(runs):
    for _, ranks in runs.values():
        assert all(rank["save_refused"].item() for rank in ranks)


@pytest.mark.parametrize(("env", "message"), [
    ({"WORLD_SIZE": "4"}, r"tp 2 but this group has 4 processes \(WORLD_SIZE\): they must be equal"),
    ({"WORLD_SIZE": "two"}, r"environment variable WORLD_SIZE must be a non-negative integer under torchrun, got "
                            r"'two'"),
    ({"WORLD_SIZE": "2", "MASTER_PORT": None}, r"tp 2: torchrun's variables MASTER_PORT are not set"),
])
def test_a_group_torchrun_did_not_describe_is_refused_before_it_starts(monkeypatch, env, message):
    for name, value in {"RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500",
                        **env}.items():
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    with pytest.raises(qvl.ConfigError, match=message):
        qvl.from_config("tiny", tp=2)
    assert not torch.distributed.is_initialized()


def test_ranks_on_cuda_take_a_device_each(monkeypatch):
    """The check `qvl generate --tp` and `qvl ablate --tp` share (no GPU needed: the count is stood in for)."""
    from qvl.parallel.group import check_rank_device

    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    cuda = torch.device("cuda")
    check_rank_device(torch.device("cuda:1"), 1, "--tp 1")  # one process: any device
    check_rank_device(torch.device("cpu"), 4, "--tp 4")  # CPU ranks share the cores
    with pytest.raises(qvl.ConfigError, match=r"--tp 2 runs each rank on cuda:LOCAL_RANK: .* got 'cuda:1'"):
        check_rank_device(torch.device("cuda:1"), 2, "--tp 2")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(qvl.ConfigError, match="--tp 2 on CUDA starts 2 local workers, one GPU each; this machine "
                                              "has 1"):
        check_rank_device(cuda, 2, "--tp 2")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    check_rank_device(cuda, 2, "--tp 2")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("WORLD_SIZE", "2")  # under torchrun the ranks may span nodes: no count
    check_rank_device(cuda, 2, "--tp 2")
