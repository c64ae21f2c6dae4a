"""The regression check's comparison (the end-to-end test runs it on real pipeline output)."""

from pipeline.regression import compare, lookup

COMMITTED = {"test": {"emotion": {"weighted_f1": 0.80, "accuracy": 0.82, "macro_f1": 0.7},
                      "sentiment": {"weighted_f1": 0.9, "accuracy": 0.9}}}


def fresh(**changes):
    metrics = {"test": {task: dict(values) for task, values in COMMITTED["test"].items()}}
    for dotted, value in changes.items():
        task, key = dotted.split("__")
        metrics["test"][task][key] = value
    return metrics


def test_identical_metrics_pass():
    assert compare(COMMITTED, fresh(), tolerance=0.0) == []


def test_drop_beyond_tolerance_fails_and_names_the_figure():
    problems = compare(COMMITTED, fresh(emotion__weighted_f1=0.70), tolerance=0.02)
    assert len(problems) == 1 and problems[0].startswith("test.emotion.weighted_f1: 0.7000 < committed 0.8000")


def test_drop_within_tolerance_and_improvements_pass():
    assert compare(COMMITTED, fresh(emotion__weighted_f1=0.79, sentiment__accuracy=0.99), tolerance=0.02) == []


def test_missing_figure_fails():
    metrics = fresh()
    del metrics["test"]["sentiment"]["accuracy"]
    assert compare(COMMITTED, metrics, tolerance=0.02) == [
        "test.sentiment.accuracy: missing from the fresh metrics (committed 0.9000)"]


def test_lookup():
    assert lookup(COMMITTED, "test.emotion.accuracy") == 0.82
    assert lookup(COMMITTED, "test.nothing.accuracy") is None
