"""The metrics writer: JSON lines in metrics.json and, on request, the same scalars as TensorBoard events."""
import pytest
import torch

from eyecool.engine import read_metrics
from eyecool.engine.events import MetricsWriter
from toy import make_toy_trainer


def _log_three_iterations(writer: MetricsWriter) -> None:
    for iteration, loss in enumerate([3.0, 2.0, 1.0]):
        writer.put(total_loss=loss, loss_sem=loss / 2, time=0.1, data_time=0.01)
        writer.write(iteration, lr=0.01 * (iteration + 1))
    writer.append_row({"iteration": 2, "PQ": 55.5})


def test_metrics_json_lines(tmp_path):
    writer = MetricsWriter(str(tmp_path), max_iter=3, log_period=1, device=torch.device("cpu"))
    _log_three_iterations(writer)
    rows = read_metrics(str(tmp_path / "metrics.json"))
    assert [r["iteration"] for r in rows] == [0, 1, 2, 2]
    assert [r.get("total_loss") for r in rows[:3]] == [3.0, 2.0, 1.0]
    assert rows[3]["PQ"] == 55.5


def test_tensorboard_events_hold_the_logged_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    writer = MetricsWriter(str(tmp_path), max_iter=3, log_period=1, device=torch.device("cpu"), tensorboard=True)
    _log_three_iterations(writer)
    writer.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("total_loss")] == [(0, 3.0), (1, 2.0), (2, 1.0)]
    assert [e.value for e in events.Scalars("lr")] == pytest.approx([0.01, 0.02, 0.03])
    assert [(e.step, e.value) for e in events.Scalars("PQ")] == [(2, pytest.approx(55.5))]


def test_tensorboard_is_silent_off_the_main_process(tmp_path):
    writer = MetricsWriter(str(tmp_path), max_iter=3, log_period=1, device=torch.device("cpu"), enabled=False,
                           tensorboard=True)
    _log_three_iterations(writer)
    assert not (tmp_path / "tensorboard").exists() and not (tmp_path / "metrics.json").exists()


def test_training_with_tensorboard_logs_every_iteration(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    make_toy_trainer(str(tmp_path), max_iter=3, batch_size=4, tensorboard=True).train()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    logged = [row["total_loss"] for row in read_metrics(str(tmp_path / "metrics.json")) if "total_loss" in row]
    assert [e.step for e in events.Scalars("total_loss")] == [0, 1, 2]
    assert [e.value for e in events.Scalars("total_loss")] == pytest.approx(logged)


def test_console_log_follows_the_current_stdout(tmp_path):
    """The console handler writes to sys.stdout as it is at each record: a stream replaced (and closed) after
    set-up, as pytest's capture or redirect_stdout do, must not turn later records into logging errors."""
    import contextlib
    import io
    import logging

    from eyecool.engine.events import LOGGER_NAME, setup_logging

    first, second = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(first):
            logger = setup_logging(str(tmp_path))
            logger.info("one")
        first.close()
        with contextlib.redirect_stdout(second):
            logger.info("two")
        assert second.getvalue().endswith("two\n")
        with open(tmp_path / "log.txt") as log:
            assert [line.split(": ", 1)[1] for line in log.read().splitlines()] == ["one", "two"]
    finally:
        for handler in list(logging.getLogger(LOGGER_NAME).handlers):
            logging.getLogger(LOGGER_NAME).removeHandler(handler)
            handler.close()
