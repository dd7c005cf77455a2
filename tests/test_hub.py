"""Push: the Hub calls are intercepted (huggingface_hub.HfApi methods), so these tests check what
would be sent — repo id, files, private flag, revision — that the token never reaches a file or
a log line, that transient errors are retried and auth errors are not, and that a failed push
leaves the export as it was."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import httpx2
import pytest
from huggingface_hub import HfApi, ModelCard
from huggingface_hub.errors import HfHubHTTPError

from distill.ship import hub
from distill.config import load_config
from tests.test_export import make_stage

TOKEN = "hf_testTOKEN0123456789abcdefSECRET"


def http_error(status: int) -> HfHubHTTPError:
    request = httpx2.Request("POST", "https://huggingface.co/api/repos/create")
    return HfHubHTTPError(f"{status} error", response=httpx2.Response(status, request=request))


class FakeHub:
    """Records the HfApi calls a push makes; `fail` maps a method to errors raised in turn."""

    def __init__(self, monkeypatch, fail: dict[str, list[BaseException]] | None = None):
        self.calls: list[tuple[str, dict]] = []
        self.uploaded: dict[str, bytes] = {}
        self.fail = {k: list(v) for k, v in (fail or {}).items()}
        for name in ("create_repo", "create_branch", "upload_folder", "whoami"):
            monkeypatch.setattr(HfApi, name, self._method(name))

    def _method(self, name):
        fake = self

        def method(api, *args, **kwargs):
            fake.calls.append((name, {"args": args, **kwargs, "token": api.token}))
            if fake.fail.get(name):
                raise fake.fail[name].pop(0)
            if name == "upload_folder":
                folder = Path(kwargs["folder_path"])
                fake.uploaded = {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
                return type("CommitInfo", (), {"commit_url": f"https://huggingface.co/{kwargs['repo_id']}/commit/abc"})()
            if name == "whoami":
                return {"name": "someuser"}
            return None

        return method

    def named(self, name: str) -> list[dict]:
        return [kw for n, kw in self.calls if n == name]


def digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(folder)).encode() + p.read_bytes())
    return h.hexdigest()


@pytest.fixture
def stage(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    return make_stage(tmp_path, "classification")


def assert_no_token(fake: FakeHub, capsys, caplog) -> None:
    out = capsys.readouterr()
    assert TOKEN not in out.out and TOKEN not in out.err
    assert not [r for r in caplog.records if TOKEN in r.getMessage()]
    assert not [name for name, data in fake.uploaded.items() if TOKEN.encode() in data]


def test_push_sends_the_export_with_repo_id_private_and_revision(stage, monkeypatch, capsys, caplog):
    caplog.set_level(logging.DEBUG)
    fake = FakeHub(monkeypatch)
    code = hub.main([str(stage), "--repo-id", "myorg/tiny-distilled-demo", "--private", "--revision", "exp-1"])
    assert code == 0
    (create,) = fake.named("create_repo")
    assert create["args"] == ("myorg/tiny-distilled-demo",) and create["private"] is True and create["exist_ok"] is True
    (branch,) = fake.named("create_branch")
    assert branch["branch"] == "exp-1"
    (upload,) = fake.named("upload_folder")
    assert upload["repo_id"] == "myorg/tiny-distilled-demo" and upload["revision"] == "exp-1"
    assert upload["token"] == TOKEN == create["token"]  # from HF_TOKEN, handed to the client only
    assert upload["commit_message"] == "Upload tiny-distilled-demo (accuracy 0.5800 on test)"
    assert Path(upload["folder_path"]) == stage / "export"
    assert {"model.safetensors", "config.json", "tokenizer.json", "README.md", "distill_config.yaml"} <= set(fake.uploaded)
    card = ModelCard(fake.uploaded["README.md"].decode())
    assert 'model="myorg/tiny-distilled-demo"' in card.text
    assert_no_token(fake, capsys, caplog)


def test_main_branch_needs_no_branch_and_private_defaults_to_the_recipe(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    stage = make_stage(tmp_path, "classification", ["hub.private=true"])
    fake = FakeHub(monkeypatch)
    assert hub.push(stage, "myorg/x", commit_message="first") is not None
    assert fake.named("create_repo")[0]["private"] is True
    assert not fake.named("create_branch") and fake.named("upload_folder")[0]["revision"] is None
    assert fake.named("upload_folder")[0]["commit_message"] == "first"


def test_transient_errors_are_retried_with_backoff(stage, monkeypatch, capsys, caplog):
    fake = FakeHub(monkeypatch, fail={
        "create_repo": [http_error(503), httpx2.ConnectError("connection reset")],
        "upload_folder": [http_error(429)],
    })
    waits: list[float] = []
    url = hub.push(stage, "myorg/x", sleep=waits.append)
    assert url == "https://huggingface.co/myorg/x/commit/abc"
    assert len(fake.named("create_repo")) == 3 and len(fake.named("upload_folder")) == 2
    assert waits == [2.0, 4.0, 2.0]
    assert "retrying" in caplog.text
    assert_no_token(fake, capsys, caplog)


def test_auth_error_is_not_retried_and_leaves_the_export_untouched(stage, monkeypatch, capsys, caplog):
    hub.push(stage, "myorg/x", dry_run=True)  # writes the export, sends nothing
    before = digest(stage / "export")
    fake = FakeHub(monkeypatch, fail={"upload_folder": [http_error(401)]})
    waits: list[float] = []
    with pytest.raises(hub.PushError) as info:
        hub.push(stage / "export", "myorg/x", sleep=waits.append)
    message = str(info.value)
    assert "401" in message and "hf auth login" in message
    assert f"distill push {stage / 'export'} --repo-id myorg/x" in message
    assert len(fake.named("upload_folder")) == 1 and waits == []
    assert digest(stage / "export") == before
    assert TOKEN not in message
    assert_no_token(fake, capsys, caplog)


def test_retries_give_up_with_a_rerun_command(stage, monkeypatch, capsys):
    FakeHub(monkeypatch, fail={"upload_folder": [http_error(502)] * 5})
    waits: list[float] = []
    monkeypatch.setattr(hub.time, "sleep", waits.append)
    assert hub.main([str(stage), "--repo-id", "myorg/x", "--revision", "b"]) == 2
    err = capsys.readouterr().err
    assert "502" in err and f"distill push {stage / 'export'} --repo-id myorg/x --revision b" in err
    assert (stage / "export" / "model.safetensors").exists()
    assert waits == [2.0, 4.0, 8.0, 16.0]  # five attempts, exponential backoff


def test_offline_mode_fails_at_once(stage, monkeypatch):
    from huggingface_hub.errors import OfflineModeIsEnabled

    fake = FakeHub(monkeypatch, fail={"create_repo": [OfflineModeIsEnabled("offline mode is enabled")]})
    with pytest.raises(hub.PushError, match="HF_HUB_OFFLINE is set"):
        hub.push(stage, "myorg/x", sleep=pytest.fail)
    assert len(fake.named("create_repo")) == 1 and not fake.named("upload_folder")


def test_token_is_scrubbed_from_error_messages(stage, monkeypatch):
    FakeHub(monkeypatch, fail={"create_repo": [RuntimeError(f"bad header Authorization: Bearer {TOKEN}")]})
    with pytest.raises(hub.PushError) as info:
        hub.push(stage, "myorg/x")
    assert TOKEN not in str(info.value) and "***" in str(info.value)


def test_dry_run_lists_files_and_prints_the_card_without_a_token(stage, monkeypatch, capsys):
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr(hub, "get_token", lambda: None)
    fake = FakeHub(monkeypatch)
    assert hub.main([str(stage), "--repo-id", "myorg/x", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "model.safetensors" in out and "README.md" in out and "# x" in out and "model-index" in out
    # without --repo-id nor hub.org, a dry run names the repo from the template with ORG
    assert hub.main([str(stage), "--dry-run"]) == 0
    assert 'model="ORG/init-distilled-classification-demo"' in capsys.readouterr().out
    assert fake.calls == []


def test_missing_token_says_how_to_log_in(stage, monkeypatch, capsys):
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr(hub, "get_token", lambda: None)
    fake = FakeHub(monkeypatch)
    assert hub.main([str(stage), "--repo-id", "myorg/x"]) == 2
    assert "HF_TOKEN" in capsys.readouterr().err and fake.calls == []


def test_export_for_another_repo_is_refused(stage, monkeypatch):
    fake = FakeHub(monkeypatch)
    hub.push(stage, "myorg/first", dry_run=True)
    results = stage / "export" / "distill_results.json"
    assert json.loads(results.read_text())["repo_id"] == "myorg/first"
    # the results file says which repo the card was written for, whatever the card's text says
    readme = stage / "export" / "README.md"
    readme.write_text(readme.read_text().replace("myorg/first", "myorg/second"))
    with pytest.raises(hub.PushError, match="exported for myorg/first"):
        hub.push(stage / "export", "myorg/second")
    # an export that does not record it (written by an older distill) is not guessed at
    data = json.loads(results.read_text())
    del data["repo_id"]
    results.write_text(json.dumps(data))
    with pytest.raises(hub.PushError, match="does not record the repo its card was written for"):
        hub.push(stage / "export", "myorg/first")
    with pytest.raises(hub.PushError, match="not a valid Hub repo id"):
        hub.push(stage, "my org/bad name")
    assert fake.calls == []


def test_push_out_to_an_existing_file_is_refused(stage, monkeypatch, capsys):
    fake = FakeHub(monkeypatch)
    taken = stage.parent / "notes.txt"
    taken.write_text("mine")
    assert hub.main([str(stage), "--repo-id", "myorg/x", "--out", str(taken)]) == 2
    assert f"--out {taken} is a file, not a folder" in capsys.readouterr().err
    assert taken.read_text() == "mine" and fake.calls == []


def test_push_from_run_names_the_repo_like_the_study(tmp_path, monkeypatch, capsys, caplog):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    stage = make_stage(tmp_path, "classification", ["task.name=pawsx", "hub.push=true"])
    cfg = load_config(stage / "config.yaml")
    cfg.student.model = "albeto-base-6"  # the name the study used; the stage folder holds a tiny model
    fake = FakeHub(monkeypatch)
    hub.push_from_run(cfg)
    assert fake.named("whoami") and fake.named("upload_folder")[0]["repo_id"] == "someuser/albert-base-6-spanish-distilled-pawsx"
    cfg.hub.org = "dccuchile"
    hub.push_from_run(cfg)
    assert fake.named("upload_folder")[1]["repo_id"] == "dccuchile/albert-base-6-spanish-distilled-pawsx"
    assert len(fake.named("whoami")) == 1
    results = json.loads(fake.uploaded["distill_results.json"])
    assert results["student"]["test"]["accuracy"] == 0.58
    assert_no_token(fake, capsys, caplog)


def test_push_from_run_ships_the_onnx_files_the_recipe_asks_for(tmp_path, monkeypatch, capsys, caplog):
    from tests.test_onnx_export import TAGGING, random_stage

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    stage = random_stage(tmp_path, "tagging", TAGGING)
    cfg = load_config(stage / "config.yaml", ["hub.org=someorg"])
    # hub settings of this run, not of the finished stage's config.yaml; a random model's int8
    # score moves by noise, hence the wide margin
    cfg.hub.export.int8, cfg.hub.export.int8_margin = True, 100.0
    fake = FakeHub(monkeypatch)
    hub.push_from_run(cfg)
    assert {"model.onnx", "model.int8.onnx", "onnx_parity.json", "model.safetensors"} <= set(fake.uploaded)
    card = fake.uploaded["README.md"].decode()
    assert "## ONNX Runtime and int8" in card and "| `model.int8.onnx` | ONNX Runtime int8 |" in card
    assert json.loads(fake.uploaded["distill_results.json"])["onnx"]["passed"] is True
    assert_no_token(fake, capsys, caplog)


def test_push_flags_and_an_export_without_the_asked_files(tmp_path, monkeypatch, capsys):
    from tests.test_onnx_export import TAGGING, random_stage

    stage = random_stage(tmp_path, "tagging", TAGGING)
    assert hub.main([str(stage), "--repo-id", "org/tiny-ner", "--dry-run"]) == 0
    assert "model.onnx" not in capsys.readouterr().out  # the recipe asks for none
    with pytest.raises(hub.PushError, match="export without model.onnx"):
        hub.push(stage / "export", "org/tiny-ner", dry_run=True, onnx_options={"onnx": True})
    assert hub.main([str(stage), "--repo-id", "org/tiny-ner", "--dry-run", "--onnx"]) == 0
    listed = capsys.readouterr().out
    assert "model.onnx" in listed and "model.int8.onnx" not in listed and "## ONNX Runtime and int8" in listed
