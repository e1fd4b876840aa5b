"""Multi-view evaluation: softmax scores averaged over each video's views, views split across workers, top-k,
the confusion matrix and per-class accuracy."""

import math

import numpy as np
import pytest
import torch

from evl.metrics import EvalResult, ViewAccumulator, gather_views, topk_correct


def accumulate(views: list[tuple[list[float], int, int]], num_classes: int) -> ViewAccumulator:
    """An accumulator fed (logits, label, video) rows one batch at a time."""
    acc = ViewAccumulator(num_classes)
    for logits, label, video in views:
        acc.add(torch.tensor([logits]), torch.tensor([label]), torch.tensor([video]))
    return acc


def softmax(logits: list[float]) -> np.ndarray:
    e = np.exp(np.array(logits, dtype=np.float64) - max(logits))
    return e / e.sum()


# Video 0 (label 0): one view sure of class 1, two views fairly sure of class 0. Mean softmax scores pick class 0
# (0.635 vs 0.365); mean logits pick class 1 ([2, 6.7]), and so would mean log-probabilities or the max over views.
VIDEO0 = [([0.0, 20.0], 0, 0), ([3.0, 0.0], 0, 0), ([3.0, 0.0], 0, 0)]
# Video 1 (label 1): two views, both for class 1. Video 2 (label 0): one view, for class 1.
VIDEO1 = [([0.0, 1.0], 1, 1), ([-1.0, 2.0], 1, 1)]
VIDEO2 = [([0.0, 4.0], 0, 2)]


def expected_scores(views) -> dict[int, np.ndarray]:
    by_video: dict[int, list[np.ndarray]] = {}
    for logits, _, video in views:
        by_video.setdefault(video, []).append(softmax(logits))
    return {video: np.mean(ps, axis=0) for video, ps in by_video.items()}


def averaged(acc: ViewAccumulator) -> dict[int, np.ndarray]:
    return {video: acc.scores[video] / acc.views[video] for video in acc.scores}


def test_views_are_combined_by_averaging_softmax_scores_not_logits():
    assert np.argmax(np.mean([v[0] for v in VIDEO0], axis=0)) == 1  # the case is one where the two disagree
    acc = accumulate(VIDEO0 + VIDEO1 + VIDEO2, num_classes=2)
    assert acc.views == {0: 3, 1: 2, 2: 1} and acc.labels == {0: 0, 1: 1, 2: 0}
    for video, scores in expected_scores(VIDEO0 + VIDEO1 + VIDEO2).items():
        np.testing.assert_allclose(averaged(acc)[video], scores, rtol=1e-6, atol=1e-7)
    result = acc.result()
    assert result.num_videos == 3  # videos, not views
    assert result.top1 == pytest.approx(2 / 3)  # videos 0 and 1 right, video 2 wrong
    np.testing.assert_array_equal(result.confusion, [[1, 1], [0, 1]])


def test_batches_may_mix_videos_and_split_one_videos_views():
    rows = VIDEO0 + VIDEO1 + VIDEO2
    order = [3, 0, 5, 1, 4, 2]  # views of a video in different batches, videos interleaved within a batch
    acc = ViewAccumulator(2)
    for batch in (order[:2], order[2:5], order[5:]):
        acc.add(torch.tensor([rows[i][0] for i in batch]).to(torch.bfloat16), torch.tensor([rows[i][1] for i in batch]),
                torch.tensor([rows[i][2] for i in batch]))
    assert acc.views == {0: 3, 1: 2, 2: 1}
    for video, scores in expected_scores(rows).items():
        np.testing.assert_allclose(averaged(acc)[video], scores, atol=2e-2)  # bf16 logits, scores in fp32
    assert acc.result().top1 == pytest.approx(2 / 3)


# Video 0's three views on two workers: rank 0 holds its two views for class 0, rank 1 the one sure of class 1, so
# a merge that kept only the last worker's scores would get video 0 wrong. Video 1's views are split too.
# Video 3 (label 1, predicted 0) has one view on rank 0 and two on rank 1; video 2 is only on rank 1.
WORKER_A = [VIDEO0[1], VIDEO1[0], VIDEO0[2], ([5.0, 0.0], 1, 3)]
WORKER_B = [VIDEO0[0], ([2.0, 1.0], 1, 3), VIDEO1[1], VIDEO2[0], ([1.0, 0.0], 1, 3)]
MERGED_VIEWS = {0: 3, 1: 2, 2: 1, 3: 3}
MERGED_CONFUSION = [[1, 1],   # true 0: video 0 -> 0, video 2 -> 1
                    [1, 1]]   # true 1: video 3 -> 0, video 1 -> 1


def test_views_of_one_video_split_across_two_workers_merge_as_if_on_one():
    a, b = accumulate(WORKER_A, 2), accumulate(WORKER_B, 2)
    a_before = {v: s.copy() for v, s in a.scores.items()}
    merged = ViewAccumulator(2)
    for state in (a.state(), b.state()):
        merged.merge(state)
    assert merged.views == MERGED_VIEWS and merged.labels == {0: 0, 1: 1, 2: 0, 3: 1}
    for video, scores in expected_scores(WORKER_A + WORKER_B).items():
        np.testing.assert_allclose(averaged(merged)[video], scores, rtol=1e-6, atol=1e-7)
    result = merged.result()
    assert result.top1 == pytest.approx(2 / 4)  # videos 0 and 1
    np.testing.assert_array_equal(result.confusion, MERGED_CONFUSION)
    # The merge copies: later merges do not write into a worker's own accumulator.
    merged.merge(accumulate(VIDEO0, 2).state())
    assert a.views == {0: 2, 1: 1, 3: 1}
    assert all(np.array_equal(a.scores[v], s) for v, s in a_before.items())


def gather_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    """One rank of a gloo group: accumulate this rank's views, gather them, write what this rank got."""
    import json

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        merged = gather_views(accumulate((WORKER_A, WORKER_B)[rank], 2))
        result = merged.result()
        with open(f"{out_dir}/rank{rank}.json", "w") as f:
            json.dump({"views": {str(k): v for k, v in merged.views.items()},
                       "scores": {str(k): (merged.scores[k] / merged.views[k]).tolist() for k in merged.scores},
                       "top1": result.top1, "confusion": result.confusion.tolist()}, f)
    finally:
        dist.destroy_process_group()


def test_gather_views_over_a_two_process_gloo_group(tmp_path):
    """What Trainer.gather_views does on every rank: all_gather_object of the states, then merge, in rank order."""
    import json
    import time

    import torch.multiprocessing as mp

    ranks = mp.start_processes(gather_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2,
                               join=False, start_method="spawn")
    deadline = time.monotonic() + 60
    while not ranks.join(timeout=1):  # raises if a rank failed
        if time.monotonic() > deadline:
            for process in ranks.processes:
                process.kill()
            pytest.fail("the two gloo ranks did not finish within 60 s")
    expected = expected_scores(WORKER_A + WORKER_B)
    for rank in range(2):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got["views"] == {str(k): v for k, v in MERGED_VIEWS.items()}  # every rank gets every video
        for video, scores in expected.items():
            np.testing.assert_allclose(got["scores"][str(video)], scores, rtol=1e-6, atol=1e-7)
        assert got["top1"] == pytest.approx(2 / 4) and got["confusion"] == MERGED_CONFUSION


def test_gather_views_without_a_process_group_is_the_identity():
    views = accumulate(VIDEO0, 2)
    assert gather_views(views) is views


def test_top5_counts_a_label_ranked_fifth_but_not_sixth():
    scores = np.array([[0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2],   # label 4: fifth -> top-5 hit
                       [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2],   # label 5: sixth -> miss
                       [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8],   # label 7: first -> top-1 and top-5 hit
                       [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]])  # label 0: last -> miss
    result = EvalResult.from_scores(scores, np.array([4, 5, 7, 0]), num_classes=8)
    assert result.top5 == pytest.approx(2 / 4) and result.top1 == pytest.approx(1 / 4)
    # With fewer than five classes every label is in the top five.
    assert EvalResult.from_scores(np.array([[0.1, 0.2, 0.7]]), np.array([0]), 3).top5 == 1.0


def test_topk_correct_counts_rows_with_the_label_among_the_k_highest():
    logits = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0, 0.0],
                           [5.0, 4.0, 3.0, 2.0, 1.0, 0.0],
                           [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]])
    labels = torch.tensor([4, 5, 5])
    assert topk_correct(logits, labels).item() == 1
    assert topk_correct(logits, labels, k=5).item() == 2
    assert topk_correct(logits, labels, k=10).item() == 3  # k above the class count: every row


def test_confusion_rows_are_true_classes_and_empty_classes_have_no_accuracy():
    # 4 classes; class 3 has no videos. Class 0: two videos, one predicted 2. Class 1: one, right. Class 2: one,
    # predicted 1.
    scores = np.array([[0.7, 0.1, 0.1, 0.1],   # true 0 -> 0
                       [0.1, 0.1, 0.7, 0.1],   # true 0 -> 2
                       [0.1, 0.7, 0.1, 0.1],   # true 1 -> 1
                       [0.1, 0.7, 0.1, 0.1]])  # true 2 -> 1
    result = EvalResult.from_scores(scores, np.array([0, 0, 1, 2]), num_classes=4)
    np.testing.assert_array_equal(result.confusion, [[1, 0, 1, 0],
                                                     [0, 1, 0, 0],
                                                     [0, 1, 0, 0],
                                                     [0, 0, 0, 0]])  # [true, predicted]
    assert result.per_class_accuracy[:3].tolist() == [0.5, 1.0, 0.0]  # class 2 has a video, none right: 0
    assert math.isnan(result.per_class_accuracy[3])  # class 3 has none: NaN, not 0
    assert result.top1 == pytest.approx(2 / 4) and result.num_videos == 4


def test_no_videos_at_all():
    result = ViewAccumulator(3).result()
    assert result.num_videos == 0 and result.confusion.shape == (3, 3) and not result.confusion.any()
    assert np.isnan(result.per_class_accuracy).all()
    assert result.metrics() == {"val_top1": 0.0, "val_top5": 0.0, "val_videos": 0.0}
