"""Files generated from serving/config.py (deploy/schema.py) are exactly what the command writes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from serving.config import ConfigError, ModelSpec, RouterSpec, parse_config

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "deploy"))
import schema  # noqa: E402


def test_generated_files_are_up_to_date():
    assert schema.stale() == [], (
        f"{', '.join(schema.stale())} differ from serving/config.py: run `{schema.COMMAND}` "
        "(then `python deploy/render.py` for k8s/) and commit the result"
    )
    assert schema.main(["--check"]) == 0


def test_a_stale_file_is_detected(tmp_path, monkeypatch, capsys):
    copy = tmp_path / "values.schema.json"
    copy.write_text(schema.SCHEMA.read_text().replace('"minimum": 1', '"minimum": 2', 1))
    monkeypatch.setattr(schema, "SCHEMA", copy)
    monkeypatch.setattr(schema, "ROOT", tmp_path)
    assert schema.stale() == ["values.schema.json"]
    assert schema.main(["--check"]) == 1
    assert f"run `{schema.COMMAND}`" in capsys.readouterr().err


def test_every_config_field_reaches_the_values_schema():
    defs = json.loads(schema.SCHEMA.read_text())["definitions"]
    assert set(defs["ModelSpec"]["properties"]) == set(ModelSpec.model_fields)
    assert set(defs["RouterSpec"]["properties"]) == set(RouterSpec.model_fields)
    assert json.loads(schema.SCHEMA.read_text())["properties"]["serving"]["$ref"] == "#/definitions/ServingConfig"


def test_template_defaults_are_the_config_defaults():
    text = schema.DEFAULTS.read_text()
    defaults = json.loads(text.split("-}}\n", 1)[1].rsplit("\n{{- end }}", 1)[0])
    assert defaults["router"] == RouterSpec().model_dump(mode="json")


SHIPPED = yaml.safe_load((ROOT / "models.yaml").read_text())
CONFIGS = {
    "shipped": (SHIPPED, True),
    "gpu file": (yaml.safe_load((ROOT / "deploy" / "models.gpu.yaml").read_text()), True),
    "fixed replicas as int": ({"models": [{"name": "m", "source": {"hub": "o/m"}, "replicas": 2}]}, True),
    "replicas 0": ({"models": [{"name": "m", "source": {"hub": "o/m"}, "replicas": 0}]}, False),
    "revision without hub": ({"models": [{"name": "m", "source": {"path": "/m", "revision": "x"}}]}, False),
    "bad name": ({"models": [{"name": "-m", "source": {"hub": "o/m"}}]}, False),
    "upper-case tag": ({"models": [{"name": "m", "source": {"hub": "o/m"}, "tags": ["Chat"]}]}, False),
    "alias with slash": ({"models": [{"name": "m", "source": {"hub": "o/m"}, "aliases": ["org/m:latest"]}]}, True),
    "port out of range": ({"router": {"port": 70000}, "models": [{"name": "m", "source": {"hub": "o/m"}}]}, False),
    "pypi sha256": ({"models": [{"name": "m", "source": {"pypi": "p==1", "file": "m", "sha256": "ab" * 32}}]}, True),
    "pypi sha256 list": ({"models": [{"name": "m", "source": {"pypi": "p==1", "file": "m", "sha256": ["ab" * 32, "cd" * 32]}}]}, True),
    "short sha256": ({"models": [{"name": "m", "source": {"pypi": "p==1", "file": "m", "sha256": ["ab"]}}]}, False),
    "sha256 with hub": ({"models": [{"name": "m", "source": {"hub": "o/m", "sha256": "ab" * 32}}]}, False),
    "file climbing out": ({"models": [{"name": "m", "source": {"pypi": "p==1", "file": "p/../../m"}}]}, False),
    "absolute file": ({"models": [{"name": "m", "source": {"pypi": "p==1", "file": "/m"}}]}, False),
    "graceful shutdown": ({"models": [{"name": "m", "source": {"hub": "o/m"}, "graceful_shutdown_timeout_s": 30}]}, True),
}


@pytest.mark.parametrize("case", list(CONFIGS))
def test_values_schema_and_config_model_agree(case):
    raw, valid = CONFIGS[case]
    values_schema = json.loads(schema.SCHEMA.read_text())
    validator = jsonschema.Draft7Validator({**values_schema, "$ref": "#/definitions/ServingConfig"})
    schema_errors = list(validator.iter_errors(raw))
    if valid:
        assert not schema_errors, [e.message for e in schema_errors]
        parse_config(raw)
    else:
        assert schema_errors
        with pytest.raises(ConfigError):
            parse_config(raw)
