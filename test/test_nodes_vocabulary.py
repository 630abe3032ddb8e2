"""The segmenter's vocabulary changes (sal_ros.nodes.vocabulary_changes) with the real tiny text encoder: the newest
request wins, a pending change is visible with its progress, a repeated request makes no new version, a failed
one is reported until a later one succeeds. A gate in the encode step holds an embedding where the test needs it
in flight; the embedding itself is the real one."""
import threading
from dataclasses import replace

import pytest

from conftest import require_rclpy, wait_for

require_rclpy()
from sal_ros.model.text_encoder import tiny_text_encoder  # noqa: E402
from sal_ros.model.vocabulary import Vocabulary, VocabularyLimits  # noqa: E402
from sal_ros.nodes.vocabulary_changes import VocabularyChanges, diagnostic_status  # noqa: E402


class Rig:
    def __init__(self):
        self.encoder = tiny_text_encoder()
        self.installed, self.announced, self.failures, self.statuses = [], [], [], []
        self.gate = threading.Event()
        self.gate.set()
        self.in_encode = threading.Event()
        self.changes = VocabularyChanges(self.encode, self.installed.append, threading.Lock(),
                                         lambda active, ms: self.announced.append(active),
                                         lambda source, exc: self.failures.append((source, exc)),
                                         lambda: self.statuses.append(self.changes.status()))

    def encode(self, vocabulary, progress=None):
        if vocabulary.class_names == ("boom",):
            raise RuntimeError("the encoder failed")

        def gated(done, total):
            progress(done, total)
            if done:
                self.in_encode.set()
                self.gate.wait()
        return self.encoder.encode(vocabulary, progress=gated if progress else None)

    def set(self, prompts):
        self.changes.check("prompts", prompts, VocabularyLimits())
        self.changes.request("prompts", prompts)


@pytest.fixture
def rig():
    rig = Rig()
    rig.changes.start(Vocabulary.from_prompts(["car", "road"]))
    yield rig
    rig.gate.set()
    rig.changes.shutdown()


def test_a_pending_change_shows_its_progress_and_a_newer_one_supersedes_it(rig):
    rig.gate.clear()
    many = [f"class {i}" for i in range(40)]
    rig.set(many)
    wait_for(rig.in_encode.is_set, what="the 40-prompt change embedding")
    status = rig.changes.status()
    assert status["state"] == "re-embedding" and status["total"] == 40 and 0 < status["done"] < 40
    assert status["text"] == f"re-embedding {status['done']}/40"
    diag = diagnostic_status("/sal_segmenter", status)
    assert diag.level == 1 and diag.message.startswith("re-embedding")  # WARN: the model runs v1 meanwhile
    rig.set(["person", "tree"])  # while the 40 prompts are in flight
    rig.gate.set()
    wait_for(lambda: rig.changes.status()["state"] == "active", what="the newest change active")
    assert rig.changes.active.class_names == ("person", "tree") and rig.changes.active.version == 2
    assert [a.version for a in rig.announced] == [2]  # the 40 prompts never became active
    assert rig.changes.status()["superseded"] == 1
    assert [s["state"] for s in rig.statuses][-1] == "active"


def test_the_same_vocabulary_again_makes_no_new_version(rig):
    """A set_parameters retried after a lost response must not re-embed or bump the version."""
    rig.set(["person", "tree"])
    wait_for(lambda: rig.changes.active.version == 2, what="v2")
    rig.set(["person", "tree"])
    rig.set([" person", "tree "])  # the same vocabulary once stripped
    assert rig.changes.status()["state"] == "active" and rig.changes.active.version == 2 and len(rig.announced) == 1


def test_a_failed_change_is_reported_until_a_later_one_succeeds(rig):
    rig.set(["boom"])
    wait_for(lambda: rig.failures, what="the failure")
    status = rig.changes.status()
    assert status["state"] == "failed" and "the encoder failed" in status["text"] and "v1 stays active" in status["text"]
    assert diagnostic_status("/sal_segmenter", status).level == 1
    assert rig.changes.active.version == 1
    rig.set(["car", "road"])  # the parameter names the active vocabulary again
    assert rig.changes.status()["state"] == "active" and rig.changes.active.version == 1


def test_the_vocabulary_parsed_at_the_check_is_the_one_the_model_runs_numbered(rig):
    """One parse, one value: the Vocabulary the on-set check parsed becomes ``active`` with its version, and the
    embeddings put into the model carry that version and its classes (what each Segmentation then names)."""
    checked = rig.changes.check("prompts", ["person", " tree"], VocabularyLimits())
    rig.changes.request("prompts", ["person", " tree"])
    wait_for(lambda: rig.changes.active.version == 2, what="v2")
    assert rig.changes.active == replace(checked, version=2) and checked.version == 0
    installed = rig.installed[-1]
    assert installed.vocabulary == rig.changes.active == rig.announced[-1]
    assert (installed.version, installed.class_names) == (2, ("person", "tree"))
