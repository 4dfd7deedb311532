"""Command-line flags come from the config models (one place), and ``serve`` and ``batch`` build
the same config from the same flags."""

from __future__ import annotations

import argparse

import pytest

from serving.api.policy import ServePolicy
from serving.cli.batch import configure_parser
from serving.cli import build_parser
from serving.engine.flags import FLAGS, MODEL_FLAGS, MODELS, config_from_args
from serving.engine.server import EngineConfig


def serve_args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["serve", "/models/skin", *argv])


def batch_args(*argv: str) -> argparse.Namespace:
    return configure_parser(argparse.ArgumentParser()).parse_args(["/models/skin", "in", "out", *argv])


@pytest.mark.parametrize("name", sorted(FLAGS))
def test_every_flag_defaults_to_its_field(name):
    flag = FLAGS[name]
    info = MODELS[flag.model].model_fields[flag.field]
    given = getattr(serve_args(), name.replace("-", "_"))
    if info.default_factory is not None:
        assert given is None  # computed from the machine by the model itself
    elif flag.field == "allowed_media_domains":
        assert tuple(given) == info.default
    else:
        assert given == (info.default // flag.scale if flag.scale != 1 else info.default)


def test_defaults_give_the_models_defaults():
    config = config_from_args(serve_args())
    assert config == EngineConfig(model="/models/skin", policy=ServePolicy(
        api_keys=config.policy.api_keys))


def test_flags_reach_their_fields_scaled():
    config = config_from_args(serve_args(
        "--max-inflight-mb", "900", "--min-upload-rate", "4", "--upload-timeout", "60",
        "--decode-timeout", "3", "--max-jpeg-scans", "40", "--port", "9000", "--enforce-eager",
        "--allowed-media-domains", "img.example.org"), api_keys=("k",))
    policy = config.policy
    assert policy.max_inflight_bytes == 900 * 2**20 and policy.min_upload_rate == 4 * 1024
    assert policy.upload_timeout_s == 60 and policy.decode_timeout_s == 3
    assert policy.max_jpeg_scans == 40 and policy.api_keys == ("k",)
    assert policy.allowed_media_domains == ("img.example.org",)
    assert config.port == 9000 and config.enforce_eager


def test_serve_and_batch_build_the_same_config_from_the_shared_flags():
    shared = ("--max-images-per-request", "2", "--max-image-pixels", "4000000", "--dtype",
              "float32", "--max-model-len", "1024", "--max-num-seqs", "8",
              "--allowed-media-domains", "a.example.org")
    served, batched = config_from_args(serve_args(*shared)), config_from_args(batch_args(*shared))
    assert batched == served.model_copy(update={"policy": served.policy.model_copy(
        update={"api_keys": ()})})
    assert set(MODEL_FLAGS) <= set(FLAGS)


def test_several_api_keys_and_a_data_folder_as_an_absolute_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = serve_args("--api-key", "a", "--api-key", "b", "--data-dir", "store",
                      "--max-file-mb", "5", "--batch-max-inflight", "3")
    config = config_from_args(args, api_keys=tuple(args.api_keys))
    assert config.policy.api_keys == ("a", "b")
    assert config.policy.data_dir == str(tmp_path / "store")
    assert config.policy.max_file_bytes == 5 * 2**20 and config.policy.batch_max_inflight == 3
    assert serve_args().api_keys is None  # then SKINGPT4_API_KEY's keys are used
    # One key in a Serve config file's policy (api_key) still reads as a list of one.
    assert ServePolicy.model_validate({"api_key": "k"}).api_keys == ("k",)
