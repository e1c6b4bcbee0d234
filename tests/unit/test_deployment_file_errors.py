"""Errors in a deployment file name the file the user gave, in the user's words."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from llama_mesh.client._exceptions import ConfigError
from llama_mesh.client._resources import read_deployment_file
from llama_mesh.client.cli import llamactl
from llama_mesh.server.apiserver.compat import config_file_from_multipart
from llama_mesh.server.apiserver.deployments import parse
from llama_mesh.server.errors import InvalidArgumentError


def test_llamactl_deploy_names_a_file_that_is_not_utf8(tmp_path: Path) -> None:
    """`llamactl deploy` of a Latin-1 file: one line naming the file, line and byte; no
    traceback, and no server needed to say so."""
    bad = tmp_path / "latin1.yml"
    bad.write_bytes(b"name: x\n# caf\xe9\n")
    result = CliRunner().invoke(
        llamactl, ["-s", "http://127.0.0.1:9", "deploy", str(bad)], prog_name="llamactl"
    )

    assert result.exit_code == 1
    assert f"{bad}:2: not valid UTF-8 (byte 13)" in result.output
    assert "Traceback" not in result.output
    with pytest.raises(ConfigError, match="save the deployment file as UTF-8"):
        read_deployment_file(bad)


def test_yaml_errors_name_the_file_given() -> None:
    """The parser's errors carry the file name passed in, else `deployment.yml`."""
    with pytest.raises(InvalidArgumentError, match=r"^my-app\.yaml:2: "):
        parse("name: x\nbogus: 1\n", file_name="my-app.yaml")
    with pytest.raises(InvalidArgumentError, match=r"^deployment\.yml:2: "):
        parse("name: x\nbogus: 1\n")


def test_the_uploaded_file_name_comes_with_the_upload() -> None:
    """A multipart upload's `config_file` part gives its content and its file name."""
    body = (
        b"--b\r\nContent-Disposition: form-data; name=config_file; filename=mine.yml\r\n\r\n"
        b"name: x\n\r\n--b--\r\n"
    )
    content, name = config_file_from_multipart("multipart/form-data; boundary=b", body)
    assert (content, name) == (b"name: x\n", "mine.yml")
