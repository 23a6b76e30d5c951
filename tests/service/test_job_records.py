"""Job records on disk: what a restart reads back is the job's last state."""

from __future__ import annotations

import json
import threading

from app.service import jobs as jobs_module
from app.service.jobs import BuildParams, Job, JobRunner


def test_a_late_record_write_never_replaces_a_newer_state(tmp_path, monkeypatch):
    """A cancel (a request thread) and the worker's final write used to race: the cancel's
    snapshot of a running job could land last, and a restart then called the finished
    build interrupted. Writes are serialised, each with the job's state at that time."""
    runner = JobRunner(catalog=None, embedder_for=None, records_dir=tmp_path)  # type: ignore[arg-type]
    job = Job("j1", "washer", BuildParams(), state="running")
    entered, release = threading.Event(), threading.Event()
    real_dump = json.dump

    def slow_first_dump(record, handle, *args, **kwargs):
        if record["state"] == "running" and not entered.is_set():
            entered.set()
            release.wait(5)
        return real_dump(record, handle, *args, **kwargs)

    monkeypatch.setattr(jobs_module.json, "dump", slow_first_dump)
    try:
        cancel_write = threading.Thread(target=runner._save, args=(job,))
        cancel_write.start()
        assert entered.wait(5)
        job.state = "cancelled"  # the worker finishes meanwhile and writes its final record
        final_write = threading.Thread(target=runner._save, args=(job,))
        final_write.start()
        final_write.join(0.5)
        release.set()
        cancel_write.join(5)
        final_write.join(5)
        record = json.loads((tmp_path / "j1.json").read_text())
        assert record["state"] == "cancelled"
    finally:
        runner.close()
