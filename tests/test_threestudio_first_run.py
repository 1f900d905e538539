"""threestudio's prompt subprocess (``spawn: true``) hands its real error back, fast: an
unreachable hub and a mistyped model folder, instead of threestudio's bare
``AssertionError: prompt embedding process failed!`` after minutes of retries."""
import glob
import os
import tempfile
import time

import pytest

pytestmark = pytest.mark.threestudio

CHILD_S = 90.0  # the spawned child's start-up (torch, transformers imports) included; no retry loop


def _errors_left() -> set:
    return set(glob.glob(os.path.join(tempfile.gettempdir(), "rfds-prompt-error-*")))


@pytest.mark.parametrize("model,message", [
    ("fake-org/fake-sd3", r"no network .*not in the local cache.*hf download fake-org/fake-sd3.*HF_HUB_OFFLINE=1"),
    ("./no-such-sd3-folder", r"model folder './no-such-sd3-folder' does not exist"),
])
def test_spawned_prompt_encoding_raises_the_childs_error(ts, tmp_path, monkeypatch, model, message):
    from threestudio_rfds.adapter.prompt_processor import PromptEncodingError

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # refused at once: "no network"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # an empty cache
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    before = _errors_left()
    cfg = {"pretrained_model_name_or_path": model, "prompt": "a red cat", "spawn": True, "use_t5": False,
           "max_sequence_length": 16, "encode_dtype": "fp32"}
    t0 = time.perf_counter()
    with pytest.raises(PromptEncodingError, match=r"the prompt embedding subprocess failed: ModelLoadError: .*" + message):
        ts.find("rfds-sd3-prompt-processor")(cfg)
    assert time.perf_counter() - t0 < CHILD_S
    assert _errors_left() <= before  # the error file is removed
