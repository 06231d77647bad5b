"""deploy/Dockerfile, read without a Docker daemon: it installs as README.md's set-up does (the
same constraints file, the same package, torch pinned by it), the build context has what the
install needs, and the image's user, config path and port are the ones the manifests expect.

Test process only: parses the Dockerfile (dockerfile-parse), README.md and the manifests.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex

import pytest
from dockerfile_parse import DockerfileParser

from server.config import Flags, load_config
from tests.deploy_manifests import DEPLOY, ROOT, workloads

DOCKERFILE = DockerfileParser(str(DEPLOY / "Dockerfile"))
INSTRUCTIONS = [(i["instruction"], i["value"]) for i in DOCKERFILE.structure]


def values(instruction: str) -> list[str]:
    return [value for name, value in INSTRUCTIONS if name == instruction]


def pip_installs(text: str) -> list[list[str]]:
    """The arguments after `pip install` in each command of a shell text."""
    lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands: list[list[str]] = [[]]
    for word in lexer:
        if word in ("&&", "||", ";", "|"):
            commands.append([])
        else:
            commands[-1].append(word)
    out = []
    for words in commands:
        for i, word in enumerate(words[:-1]):
            if word.endswith("pip") and words[i + 1] == "install":
                out.append(words[i + 2 :])
    return out


def split_install(args: list[str]) -> tuple[list[str], list[str], bool]:
    """(constraint files, packages, editable) of `pip install` arguments."""
    constraints, packages, editable = [], [], False
    words = iter(args)
    for word in words:
        if word in ("-c", "--constraint"):
            constraints.append(next(words))
        elif word in ("-e", "--editable"):
            editable = True
        elif word in ("--index-url", "--extra-index-url"):
            next(words)
        elif not word.startswith("-") and "$" not in word:  # not an option or an expansion
            packages.append(word)
    return constraints, packages, editable


def readme_setup() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Set-up", 1)[1]
    block = re.search(r"```sh\n(.*?)```", section, re.S)
    assert block
    (install,) = pip_installs(block.group(1))
    return install


def test_the_image_installs_what_the_readme_set_up_installs() -> None:
    readme_constraints, readme_packages, _ = split_install(readme_setup())
    assert (readme_constraints, readme_packages) == (["constraints.txt"], ["."])
    installs = [args for run in values("RUN") for args in pip_installs(run)]
    assert len(installs) == 3  # torch on CPU, torch on CUDA, then the package
    for args in installs:
        constraints, packages, editable = split_install(args)
        assert constraints == readme_constraints, args  # every install pinned the same way
        assert not editable
    packages = [split_install(args)[1] for args in installs]
    assert packages == [["torch"], ["torch"], readme_packages]
    assert re.search(r"^torch==\S+$", (ROOT / "constraints.txt").read_text(), re.M)


def test_the_torch_builds_are_checked_in_the_image() -> None:
    runs = values("RUN")
    cpu = next(r for r in runs if "TORCH_INDEX_URL is required" in r)
    cuda = next(r for r in runs if "not a CUDA build of torch" in r)
    assert '--index-url "$TORCH_INDEX_URL"' in cpu and "torch.version.cuda" in cpu
    assert "torch.version.cuda" in cuda
    stages = [v.split(" AS ")[1] for v in values("FROM")]
    assert stages == ["base", "torch-cpu", "torch-cuda", "server"]
    assert values("FROM")[-1] == "torch-${TORCH_VARIANT} AS server"
    assert "TORCH_VARIANT=cpu" in values("ARG")  # the CPU image unless told otherwise


def test_the_build_context_holds_what_the_install_needs() -> None:
    copied = [shlex.split(v)[0] for v in values("COPY")]
    sources = [s for v in values("COPY") for s in shlex.split(v)[:-1]]
    assert copied[0] == "constraints.txt"  # before any install
    pyproject = (ROOT / "pyproject.toml").read_text()
    packages = 'include = ["server*", "client*", "bench*"]'
    assert 'readme = "README.md"' in pyproject and packages in pyproject
    for needed in ("pyproject.toml", "README.md", "server/", "client/", "deploy/microbatch.toml"):
        assert needed in sources, needed
    assert "bench/" not in sources  # the tooling stays out of the server's image
    patterns = [line for line in (ROOT / ".dockerignore").read_text().splitlines() if line.strip()]
    for source in sources:  # .dockerignore excludes all, then lets these back in
        path = source.rstrip("/")
        kept = False
        for pattern in (p for p in patterns if not p.startswith("#")):
            if fnmatch.fnmatch(path, pattern.lstrip("!")):
                kept = pattern.startswith("!")
        assert kept, source


def test_user_config_and_port_match_the_manifests() -> None:
    user, group = values("USER")[-1].split(":")
    entrypoint = json.loads(values("ENTRYPOINT")[-1])
    command = json.loads(values("CMD")[-1])
    assert entrypoint[-1] == "microbatch" and entrypoint[0] == "tini"
    config_path = command[command.index("--config") + 1]
    assert f"deploy/microbatch.toml {config_path}" in values("COPY")
    config = load_config(str(DEPLOY / "microbatch.toml"), {}, Flags())
    assert (config.server.host, config.server.port) == ("0.0.0.0", 8080)
    assert values("EXPOSE") == [str(config.server.port)]
    for w in workloads():
        security = w.pod["securityContext"]
        assert (str(security["runAsUser"]), str(security["runAsGroup"])) == (user, group)
        assert "command" not in w.container  # the image's entrypoint (tini, microbatch) stays
        assert w.config_path() == config_path  # the ConfigMap takes the default's place
        assert [p["containerPort"] for p in w.container["ports"]] == [config.server.port]


@pytest.mark.parametrize("variable", ["PYTHONDONTWRITEBYTECODE=1", "PIP_NO_CACHE_DIR=1"])
def test_the_image_writes_nothing_it_does_not_need(variable: str) -> None:
    assert any(variable in value for value in values("ENV"))


def test_the_python_of_the_image_is_one_the_package_supports() -> None:
    image = next(v for v in values("ARG") if v.startswith("PYTHON_IMAGE="))
    version = re.search(r"python:(\d+)\.(\d+)", image)
    assert version
    required = re.search(
        r'requires-python = ">=(\d+)\.(\d+)"', (ROOT / "pyproject.toml").read_text()
    )
    assert required
    assert tuple(map(int, version.groups())) >= tuple(map(int, required.groups()))
