"""Policy matching and policy parsing (CLI rules and TOML files), including every error."""

from __future__ import annotations

import errno
import grp
import os
import pwd
import re
from pathlib import Path

import pytest

from isofs.views import config
from isofs.views.callers import Caller
from isofs.views.config import ConfigError, build_policy, load_policy_file, parse_rule
from isofs.views.policy import VIEW_NATIVE, VIEW_TARGET, Policy, Rule

ROOT_USER = pwd.getpwuid(0).pw_name
ROOT_GROUP = grp.getgrgid(0).gr_name
NO_SUCH_NAME = "isofs-no-such-name"


def caller(**overrides: object) -> Caller:
    """A plausible caller: vim run by uid 1000 from a bash in a user session."""
    fields: dict[str, object] = {
        "pid": 4242,
        "uid": 1000,
        "gid": 1000,
        "groups": frozenset({1000, 27}),
        "exe": "/usr/bin/vim",
        "cgroup": "/user.slice/user-1000.slice/session-2.scope",
        "comm": "vim",
        "start_time": 12345,
        "ancestors": ("/usr/bin/bash", "/usr/sbin/sshd", "/usr/lib/systemd/systemd"),
    }
    fields.update(overrides)
    return Caller(**fields)  # type: ignore[arg-type]


def target(**conditions: object) -> Rule:
    return Rule(VIEW_TARGET, **conditions)  # type: ignore[arg-type]


# -- matching ------------------------------------------------------------------------------


def test_rule_without_conditions_matches_everything() -> None:
    rule = target()
    assert rule.unconditional
    assert rule.matches(caller())
    assert rule.matches(caller(exe="", ancestors=(), cgroup=""))


@pytest.mark.parametrize(
    ("conditions", "expected"),
    [
        ({"exe": "/usr/bin/vim"}, True),
        ({"exe": "/usr/bin/vi"}, False),
        ({"exe": "/usr/bin/vi*"}, True),
        ({"exe": "*/vim"}, True),
        ({"exe": "/usr/*"}, True),  # '*' crosses '/'
        ({"exe": "/usr/bin/[uv]im"}, True),
        ({"exe": "/USR/BIN/VIM"}, False),  # case-sensitive
        ({"uid": 1000}, True),
        ({"uid": 0}, False),
        ({"gid": 1000}, True),  # primary
        ({"gid": 27}, True),  # supplementary
        ({"gid": 4}, False),
        ({"cgroup": "/user.slice/*"}, True),
        ({"cgroup": "/system.slice/*"}, False),
        ({"ancestor": "/usr/sbin/sshd"}, True),  # any ancestor, not only the parent
        ({"ancestor": "*/systemd"}, True),
        ({"ancestor": "/usr/bin/rsync"}, False),
        ({"comm": "vi?"}, True),
        ({"comm": "emacs"}, False),
        ({"exe": "/usr/bin/vim", "uid": 1000, "gid": 27}, True),
        ({"exe": "/usr/bin/vim", "uid": 0}, False),  # all conditions must hold
        ({"cgroup": "/user.slice/*", "comm": "bash"}, False),
    ],
)
def test_conditions(conditions: dict[str, object], expected: bool) -> None:
    assert target(**conditions).matches(caller()) is expected


def test_ancestor_does_not_match_the_caller_itself() -> None:
    assert not target(ancestor="/usr/bin/vim").matches(caller())
    assert not target(ancestor="*").matches(caller(ancestors=()))


def test_first_match_wins() -> None:
    policy = Policy(
        rules=(
            Rule(VIEW_NATIVE, ancestor="/usr/bin/rsync"),
            Rule(VIEW_TARGET, exe="/usr/bin/*"),
            Rule(VIEW_NATIVE, exe="/usr/bin/vim"),
        )
    )
    assert policy.view_for(caller()) == VIEW_TARGET
    assert policy.view_for(caller(ancestors=("/usr/bin/rsync",))) == VIEW_NATIVE
    assert policy.view_for(caller(exe="/opt/vim")) == VIEW_NATIVE  # default


def test_default_view_for_no_match_and_unknown_caller() -> None:
    policy = Policy(rules=(target(exe="/usr/bin/vim"),), default_view=VIEW_NATIVE)
    assert policy.view_for(caller(exe="/usr/bin/cat")) == VIEW_NATIVE
    assert policy.view_for(None) == VIEW_NATIVE
    flipped = Policy(rules=(Rule(VIEW_NATIVE, uid=0),), default_view=VIEW_TARGET)
    assert flipped.view_for(caller()) == VIEW_TARGET
    assert flipped.view_for(caller(uid=0)) == VIEW_NATIVE
    assert Policy(rules=(target(),)).view_for(None) == VIEW_NATIVE


def test_views_and_single_view() -> None:
    assert Policy().views == {VIEW_NATIVE}
    assert Policy().is_single_view
    assert Policy(default_view=VIEW_TARGET).views == {VIEW_TARGET}
    two = Policy(rules=(target(uid=1000),))
    assert two.views == {VIEW_NATIVE, VIEW_TARGET}
    assert not two.is_single_view
    # Only rules for the default view: still one view.
    assert Policy(rules=(Rule(VIEW_NATIVE, uid=0),)).is_single_view
    # Rules after an unconditional rule are unreachable.
    shadowed = Policy(rules=(Rule(VIEW_NATIVE), target(uid=0)))
    assert shadowed.is_single_view
    # The default stays reachable (callers that vanished get it).
    assert Policy(rules=(target(),)).views == {VIEW_NATIVE, VIEW_TARGET}


def test_describe() -> None:
    policy = Policy(
        rules=(
            Rule(VIEW_TARGET, exe="/usr/bin/vim", uid=1000, origin="policy.toml rule 1"),
            Rule(VIEW_NATIVE),
        ),
        default_view=VIEW_NATIVE,
    )
    assert policy.describe() == [
        "rule 1: target if exe='/usr/bin/vim' uid=1000  [policy.toml rule 1]",
        "rule 2: native if any process",
        "default: native",
    ]


def test_rules_compare_by_value() -> None:
    assert target(exe="/a") == target(exe="/a")
    assert hash(target(exe="/a")) == hash(target(exe="/a"))
    assert target(exe="/a") != target(exe="/b")


# -- CLI rules -----------------------------------------------------------------------------


def test_parse_rule_all_keys() -> None:
    rule = parse_rule(
        "exe=/usr/bin/vim, uid=1000,gid=27,cgroup=/user.slice/*,ancestor=*/bash,comm=vim",
        VIEW_TARGET,
        "--target x",
    )
    assert rule == Rule(
        VIEW_TARGET,
        exe="/usr/bin/vim",
        uid=1000,
        gid=27,
        cgroup="/user.slice/*",
        ancestor="*/bash",
        comm="vim",
        origin="--target x",
    )


def test_parse_rule_names() -> None:
    rule = parse_rule(f"uid={ROOT_USER},gid={ROOT_GROUP}", VIEW_NATIVE, "--ignore x")
    assert (rule.uid, rule.gid, rule.view) == (0, 0, VIEW_NATIVE)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            f"exe=/usr/bin/vim,uid={NO_SUCH_NAME}",
            f"uid: no such user '{NO_SUCH_NAME}'",
        ),
        (f"gid={NO_SUCH_NAME}", f"gid: no such group '{NO_SUCH_NAME}'"),
        ("uid=4294967295", "uid: 4294967295 is out of range (0 to 4294967294)"),
        ("gid=-1", "gid: -1 is out of range (0 to 4294967294)"),
        ("exe=", "exe: empty value"),
        ("exe=/a,uid=", "uid: empty value"),
        ("uid=1,uid=2", "uid: duplicate key"),
        ("exe_path=/usr/bin/vim", "unknown key 'exe_path'"),
        ("uidd=1", "unknown key 'uidd' (did you mean 'uid'?)"),
        ("/usr/bin/vim", "'/usr/bin/vim': expected key=value"),
        ("exe=/a,", "empty condition: expected key=value"),
        ("", "empty rule"),
        ("exe=vim", "exe: 'vim' can never match, exe paths are absolute (did you mean '*/vim'?)"),
        ("ancestor=bash", "ancestor: 'bash' can never match"),
        ("cgroup=user.slice", "cgroup: 'user.slice' can never match"),
        ("comm=a-very-long-process-name", "comm: 'a-very-long-process-name' can never match"),
    ],
)
def test_parse_rule_errors(text: str, message: str) -> None:
    origin = f"--target '{text}'"
    with pytest.raises(ConfigError) as error:
        parse_rule(text, VIEW_TARGET, origin)
    assert str(error.value).startswith(f"{origin}: {message}")
    assert "\n" not in str(error.value)


def test_parse_rule_error_example_from_docs() -> None:
    with pytest.raises(ConfigError, match=r"^--target 'exe=/usr/bin/vim,uid=.*': uid: no such"):
        build_policy(None, [f"exe=/usr/bin/vim,uid={NO_SUCH_NAME}"], [], None)


def test_comm_globs_may_be_long() -> None:
    assert parse_rule("comm=a-very-long-*", VIEW_TARGET, "x").comm == "a-very-long-*"


# -- TOML files ----------------------------------------------------------------------------


def write(tmp_path: Path, text: str, name: str = "policy.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


EXAMPLE = """\
default_view = "native"      # or "target"
[[rule]]
view = "target"
exe = "/usr/bin/vim"
uid = 1000
[[rule]]
view = "native"
ancestor = "/usr/bin/rsync"
"""


def test_load_policy_file(tmp_path: Path) -> None:
    path = write(tmp_path, EXAMPLE)
    default, rules = load_policy_file(path)
    assert default == VIEW_NATIVE
    assert rules == [
        Rule(VIEW_TARGET, exe="/usr/bin/vim", uid=1000, origin=f"{path} rule 1"),
        Rule(VIEW_NATIVE, ancestor="/usr/bin/rsync", origin=f"{path} rule 2"),
    ]


def test_load_policy_file_minimal(tmp_path: Path) -> None:
    assert load_policy_file(write(tmp_path, "")) == (None, [])
    text = f'[[rule]]\nview="target"\nuid="{ROOT_USER}"'
    default, rules = load_policy_file(write(tmp_path, text))
    assert default is None
    assert rules[0].uid == 0
    assert rules[0].unconditional is False
    _, (match_all,) = load_policy_file(write(tmp_path, '[[rule]]\nview="target"\n'))
    assert match_all.unconditional


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[[rule]]\nview = "target"\nexe_path = "/x"', "rule 1: unknown key 'exe_path'"),
        (
            '[[rule]]\nview = "native"\n[[rule]]\nview = "target"\nexe_path = "/x"',
            "rule 2: unknown key 'exe_path'",
        ),
        ('[[rule]]\nview = "plain"', 'rule 1: view must be "target" or "native", not "plain"'),
        ("[[rule]]\nview = 1", 'rule 1: view must be "target" or "native", not an integer'),
        ('[[rule]]\nexe = "/x"', "rule 1: missing key 'view'"),
        ('[[rule]]\nview = "target"\nuid = [1000]', "rule 1: uid must be an integer or a user"),
        ('[[rule]]\nview = "target"\nuid = true', "rule 1: uid must be an integer or a user"),
        ('[[rule]]\nview = "target"\ngid = 1.5', "rule 1: gid must be an integer or a group"),
        ('[[rule]]\nview = "target"\nuid = -1', "rule 1: uid: -1 is out of range"),
        (
            f'[[rule]]\nview = "target"\nuid = "{NO_SUCH_NAME}"',
            f"rule 1: uid: no such user '{NO_SUCH_NAME}'",
        ),
        ('[[rule]]\nview = "target"\nexe = 3', "rule 1: exe must be a string, not an integer"),
        ('[[rule]]\nview = "target"\ncomm = ["a"]', "rule 1: comm must be a string, not an array"),
        ('[[rule]]\nview = "target"\nexe = ""', "rule 1: exe: empty value"),
        ('[[rule]]\nview = "target"\nexe = "vim"', "rule 1: exe: 'vim' can never match"),
        ('[[rule]]\nview = "target"\n[rule.x]\ny = 1', "rule 1: unknown key 'x'"),
        ('default_view = "plain"', 'default_view must be "target" or "native", not "plain"'),
        ("default_view = 0", 'default_view must be "target" or "native", not an integer'),
        ('defaultview = "native"', "unknown top-level key 'defaultview' (did you mean"),
        ('[[rules]]\nview = "target"', "unknown top-level key 'rules' (did you mean"),
        ('[rule]\nview = "target"', "'rule' must be an array of tables: write [[rule]]"),
        ("rule = 3", "'rule' must be an array of tables"),
        ("rule = [1]", "rule 1: must be a table, not an integer"),
        ('default_view = "native"\n\n[[rule]\nview = "target"', "line 3: "),
        ('default_view = "native"\nview "target"', "line 2: "),
        ('x = "unterminated', "line 1: "),
    ],
)
def test_load_policy_file_errors(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as error:
        load_policy_file(path)
    assert str(error.value).startswith(f"{path}: {message}")
    assert "\n" not in str(error.value)


def test_toml_syntax_error_keeps_tomllib_message(tmp_path: Path) -> None:
    path = write(tmp_path, 'default_view = "native"\n\n[[rule]\n')
    with pytest.raises(ConfigError, match=r": line 3: .+ \(column \d+\)$"):
        load_policy_file(path)


def test_load_policy_file_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_bytes(b'default_view = "native"\n# caf\xe9\n')
    with pytest.raises(ConfigError, match=r": line 2: not valid UTF-8$"):
        load_policy_file(path)


def test_load_policy_file_missing_and_unreadable(tmp_path: Path) -> None:
    missing = tmp_path / "absent.toml"
    with pytest.raises(ConfigError, match=r"absent\.toml: no such file$"):
        load_policy_file(missing)
    with pytest.raises(ConfigError, match=r": is a directory"):
        load_policy_file(tmp_path)
    unreadable = Path(write(tmp_path, EXAMPLE, "secret.toml"))
    unreadable.chmod(0)
    try:
        if os.access(unreadable, os.R_OK):
            pytest.skip("running with CAP_DAC_OVERRIDE: cannot make a file unreadable")
        with pytest.raises(ConfigError, match=r"secret\.toml: permission denied$"):
            load_policy_file(unreadable)
    finally:
        unreadable.chmod(0o600)


@pytest.mark.parametrize(
    ("error", "message"),
    [
        (PermissionError(errno.EACCES, "Permission denied"), "permission denied"),
        (OSError(errno.EIO, "Input/output error"), "cannot read: Input/output error"),
    ],
)
def test_load_policy_file_read_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: OSError, message: str
) -> None:
    path = write(tmp_path, EXAMPLE)

    def failing_open(*args: object, **kwargs: object) -> None:
        raise error

    monkeypatch.setattr(config, "open", failing_open, raising=False)
    with pytest.raises(ConfigError, match=rf"^{re.escape(path)}: {message}$"):
        load_policy_file(path)


# -- build_policy --------------------------------------------------------------------------


def test_build_policy_order_and_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, EXAMPLE.replace('"native"      #', '"target" #'))
    policy = build_policy(path, ["uid=1000", "exe=/bin/cat"], ["comm=backup"], None)
    assert [(r.view, r.origin) for r in policy.rules] == [
        (VIEW_NATIVE, "--ignore 'comm=backup'"),
        (VIEW_TARGET, "--target 'uid=1000'"),
        (VIEW_TARGET, "--target 'exe=/bin/cat'"),
        (VIEW_TARGET, f"{path} rule 1"),
        (VIEW_NATIVE, f"{path} rule 2"),
    ]
    assert policy.default_view == VIEW_TARGET  # from the file
    # An explicit --ignore beats a --target that also matches.
    assert policy.view_for(caller(comm="backup")) == VIEW_NATIVE
    assert build_policy(path, [], [], VIEW_NATIVE).default_view == VIEW_NATIVE  # CLI wins


def test_build_policy_without_file() -> None:
    policy = build_policy(None, [], [], None)
    assert policy == Policy(rules=(), default_view=VIEW_NATIVE)
    assert policy.is_single_view
    assert build_policy(None, [], [], VIEW_TARGET).views == {VIEW_TARGET}
    assert not build_policy(None, ["uid=0"], [], None).is_single_view


def test_build_policy_bad_default_view() -> None:
    with pytest.raises(ConfigError, match=r'^--default-view must be "target" or "native", not '):
        build_policy(None, [], [], "plain")


def test_build_policy_names_the_ignore_option() -> None:
    with pytest.raises(ConfigError, match=r"^--ignore 'uid=0,uid=1': uid: duplicate key$"):
        build_policy(None, [], ["uid=0,uid=1"], None)
