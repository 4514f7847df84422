"""Two processes on CPU with the gloo backend (what torchrun starts): DDP training and register-batch."""
import csv
import hashlib
import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from dataset_standins import TinyStandInEncoder, acdc_config, make_acdc

WORLD = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, port, config_values, pairs_csv, batch_out, results):
    """One rank: environment as torchrun sets it, then training and a batch of registrations."""
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(WORLD), "LOCAL_RANK": str(rank), "SAMIR_THREADS": "1"})
    torch.set_num_threads(1)
    from samir.cli import main
    from samir.distributed import init_distributed, shutdown_distributed
    from samir.training import config_from_dict, train
    context = init_distributed("cpu")
    try:
        result = train(config_from_dict(config_values), encoder=TinyStandInEncoder(), context=context)
        digest = hashlib.sha256()  # of the parameters this rank ends with (DDP keeps the replicas equal)
        for name, tensor in sorted(result.net.state_dict().items()):
            digest.update(name.encode() + tensor.detach().cpu().numpy().tobytes())
        code = main(["register-batch", str(pairs_csv), "--out", str(batch_out), "--device", "cpu", "--preset", "fast",
                     "--levels", "2", "--iterations", "4,4"])
        (results / f"rank{rank}.json").write_text(json.dumps({
            "backend": context.backend, "steps": result.step, "parameters_sha256": digest.hexdigest(),
            "best_val_dice": result.best_val_dice,
            "register_batch_exit_code": code}))
    finally:
        shutdown_distributed(context)


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    root = make_acdc(tmp_path_factory.mktemp("acdc"), range(1, 4), seed=5)
    out = tmp_path_factory.mktemp("ddp")
    config = acdc_config(root, out, data={"splits": {"train": "1-2", "val": "3"}}, optim={"epochs": 2},
                         train={"log_every": 1})
    frames = sorted((root / "patient003").glob("*_frame??.nii.gz"))
    pairs = out / "pairs.csv"
    pairs.write_text("name,fixed,moving,fixed_seg,moving_seg\n"
                     f"first,{frames[1]},{frames[0]},{str(frames[1]).replace('.nii', '_gt.nii')},"
                     f"{str(frames[0]).replace('.nii', '_gt.nii')}\n"
                     f"second,{frames[0]},{frames[1]},,\n"
                     f"broken,{frames[0]},{out / 'missing.nii.gz'},,\n")
    results = out / "results"
    results.mkdir()
    mp.spawn(_worker, args=(free_port(), config, pairs, out / "batch", results), nprocs=WORLD, join=True)
    ranks = [json.loads((results / f"rank{r}.json").read_text()) for r in range(WORLD)]
    return out, ranks


@pytest.mark.slow
def test_two_process_gloo_training_and_its_checkpoint(two_process_run):
    from samir.checkpoint import load_model
    out, ranks = two_process_run
    run = out / "run"
    assert all(r["backend"] == "gloo" for r in ranks)
    # 4 training pairs over 2 ranks: 2 steps per epoch, 2 epochs
    assert [r["steps"] for r in ranks] == [4, 4]
    assert ranks[0]["best_val_dice"] == ranks[1]["best_val_dice"]  # validation Dice is all-reduced
    assert ranks[0]["parameters_sha256"] == ranks[1]["parameters_sha256"]  # gradients were averaged
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert log[0]["event"] == "start" and log[0]["world_size"] == 2
    assert [r["step"] for r in log if r["event"] == "train"] == [1, 2, 3, 4]
    assert all(r["pairs_per_s"] > 0 for r in log if r["event"] == "train")
    model = load_model(run / "model_best.pt")
    assert model.extra["world_size"] == 2 and model.config.feature_channels == 4
    assert not list(run.glob(".*.tmp"))  # only rank 0 wrote, atomically


def test_two_process_register_batch(two_process_run):
    out, ranks = two_process_run
    rows = list(csv.DictReader(open(out / "batch" / "batch_summary.csv")))
    assert [r["name"] for r in rows] == ["first", "second", "broken"]
    assert [r["rank"] for r in rows] == ["0", "1", "0"]  # pair i goes to rank i mod 2
    assert [r["status"] for r in rows] == ["ok", "ok", "error"]
    assert "does not exist" in rows[2]["error"]
    assert float(rows[0]["dice_after_mean"]) > 0 and rows[1]["dice_after_mean"] == ""
    for name in ("first", "second"):
        assert (out / "batch" / name / "summary.json").is_file() and (out / "batch" / name / "transform.h5").is_file()
    assert [r["register_batch_exit_code"] for r in ranks] == [1, 0]  # rank 0 reports the failed pair
