"""The run writer: what ``train`` leaves in its run folder besides the model file (``runs`` lists them):
history.json and metrics.json (written after the head stage already, so an interrupted run has them), then
MODEL_CARD.md, history.png, the label audit's CSV and report.html when there are test metrics. Everything is
read from the fit's state (``training.state.FitState``) and the model's metadata."""

from __future__ import annotations

import os

from transferkit import runs
from transferkit.files import write_json_atomic

SUMMARY_FINE_TUNE = ("epochs", "unfreeze_top", "learning_rate", "blocks", "best_epoch", "history")


def summary(state) -> dict:
    """What ``metrics.json`` holds and ``transferkit.train`` returns (a dict a notebook shows as tables)."""
    from transferkit.reports.metrics import Metrics

    result = Metrics({"model_path": state.model_path, "validation": state.validation,
                      "best_epoch": state.best_epoch, "timing": state.timing, "skipped": state.skipped})
    if state.head_choice:
        result["head_choice"] = state.head_choice
    if state.fine_tune:
        result["fine_tune"] = {k: state.fine_tune.get(k) for k in SUMMARY_FINE_TUNE}
    if state.label_audit is not None:
        result["label_audit"] = state.label_audit.to_json()
    if state.test:
        result["test"] = state.test
        result["report"] = os.path.join(state.out, "report.html")
    return result


def curves(state) -> tuple[dict, dict, int | None]:
    """(history.json's record, both stages' curves end to end, the epoch where the second stage began)."""
    from transferkit.training.callbacks import MONITOR

    record = {"history": state.history, "best_epoch": state.best_epoch, "monitor": MONITOR}
    if not state.fine_tune:
        return record, state.history, None
    tuned = state.fine_tune.get("history", {})
    boundary = len(state.history["loss"])
    best = boundary + state.fine_tune["best_epoch"] if state.fine_tune.get("best_epoch") else state.best_epoch
    record |= {"fine_tune_history": tuned, "best_epoch": best, "head_best_epoch": state.best_epoch}
    return record, {k: state.history[k] + tuned.get(k, []) for k in state.history}, boundary


class RunWriter:
    """Writes the run folder ``state.out`` of a fit."""

    def __init__(self, state):
        self.state = state

    def write_records(self) -> dict:
        """history.json and metrics.json; returns history.json's record."""
        record = curves(self.state)[0]
        write_json_atomic(os.path.join(self.state.out, "history.json"), record)
        write_json_atomic(os.path.join(self.state.out, "metrics.json"), summary(self.state))
        return record

    def write_run(self, predictor, metadata: dict) -> None:
        """The records, MODEL_CARD.md, history.png, and report.html when there are test metrics (its galleries'
        heat maps from ``predictor``, the classifier)."""
        from transferkit.reports.card import write_model_card
        from transferkit.reports.explain import report_overlays
        from transferkit.reports.html import model_summary, write_report
        from transferkit.reports.plots import plot_history

        state, out = self.state, self.state.out
        record = self.write_records()
        write_model_card(metadata, os.path.join(out, runs.CARD_NAME))
        _, both, boundary = curves(state)
        history_png = plot_history(both, os.path.join(out, "history.png"), record["best_epoch"],
                                   stage_boundary=boundary)
        section = self._audit_section()
        if state.test:
            title = f"Test report: {os.path.basename(os.path.abspath(out))}"
            write_report(state.test, out, title=title, history_png=history_png, model_info=model_summary(metadata),
                         overlays=None if state.task.multi_label else report_overlays(predictor, state.test),
                         sections=section, task=state.task)

    def _audit_section(self) -> str:
        if self.state.label_audit is None:
            return ""
        from transferkit.reports.html import label_audit_section
        from transferkit.training.audit import CSV_NAME, write_csv

        written = write_csv(self.state.label_audit, os.path.join(self.state.out, CSV_NAME))
        return label_audit_section(self.state.label_audit, written)
