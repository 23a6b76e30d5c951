from __future__ import annotations

import pytest
from pydantic import ValidationError

from app.service.settings import Settings, get_settings


def test_reads_prefixed_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("PATCHCORE_MODELS_DIR", str(tmp_path))
    monkeypatch.setenv("PATCHCORE_MAX_BATCH_SIZE", "12")
    monkeypatch.setenv("PATCHCORE_MAX_WAIT_MS", "7.5")
    monkeypatch.setenv("PATCHCORE_QUEUE_SIZE", "99")
    monkeypatch.setenv("PATCHCORE_MAX_UPLOAD_MB", "3")
    monkeypatch.setenv("PATCHCORE_MAX_IMAGE_PIXELS", "1000")
    monkeypatch.setenv("PATCHCORE_MAX_IMAGES_PER_REQUEST", "5")
    monkeypatch.setenv("PATCHCORE_DEVICE", "cpu")
    monkeypatch.setenv("PATCHCORE_ADMIN_API_KEY", "k" * 32)
    s = Settings()
    assert (s.models_dir, s.max_batch_size, s.max_wait_ms, s.queue_size) == (tmp_path, 12, 7.5, 99)
    assert s.max_upload_bytes == 3 * 1024 * 1024 and s.max_image_pixels == 1000
    assert s.max_images_per_request == 5 and s.device == "cpu"
    assert s.admin_api_key.get_secret_value() == "k" * 32
    assert "k" * 32 not in repr(s)


def test_get_settings_is_cached_and_lazy(monkeypatch):
    get_settings.cache_clear()
    monkeypatch.setenv("PATCHCORE_QUEUE_SIZE", "7")
    try:
        assert get_settings() is get_settings()
        assert get_settings().queue_size == 7
    finally:
        get_settings.cache_clear()


@pytest.mark.parametrize("env", [
    {"PATCHCORE_ADMIN_API_KEY": "short"},
    {"PATCHCORE_DEV_OPEN_ADMIN": "true"},
    {"PATCHCORE_DEVICE": "tpu"},
    {"PATCHCORE_MAX_BATCH_SIZE": "0"},
    {"PATCHCORE_LOG_LEVEL": "verbose"},
])
def test_refuses_unsafe_or_invalid_settings(monkeypatch, env):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ValidationError):
        Settings()


def test_open_admin_only_in_development(monkeypatch):
    monkeypatch.setenv("PATCHCORE_DEV_OPEN_ADMIN", "true")
    monkeypatch.setenv("PATCHCORE_ENVIRONMENT", "development")
    assert Settings().admin_open


@pytest.mark.parametrize("written", ["warning", "Warning", "WARNING"])
def test_log_level_in_any_case(monkeypatch, written):
    """uvicorn's own flag is lowercase: the same word must not stop the service from starting."""
    monkeypatch.setenv("PATCHCORE_LOG_LEVEL", written)
    assert Settings().log_level == "WARNING"
