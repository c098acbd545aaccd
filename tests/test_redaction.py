"""Redaction: built-in detectors, JSON and MCP walking, streams, linear time.

Test secrets are generated at run time (seeded random characters after the
vendor prefix), so no secret-looking literal sits in the repository in one piece.
"""

from __future__ import annotations

import json
import random
import string
import time
from collections import Counter

import jwt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bastion.policy.regex import RegexError
from bastion.redaction import DETECTORS, Redactor, block_placeholder

ALNUM = string.ascii_letters + string.digits
UPPER_DIGITS = string.ascii_uppercase + string.digits
B64 = ALNUM + "+/"
URLSAFE = ALNUM + "_-"


def rand(alphabet: str, n: int, seed: int) -> str:
    rng = random.Random(seed)
    out = "".join(rng.choice(alphabet) for _ in range(n))
    # Random strings over an alphabet with digits could lack one; real keys rarely do.
    return (
        out[:-1] + "7"
        if not any(c.isdigit() for c in out) and any(c.isdigit() for c in alphabet)
        else out
    )


def pem_block(kind: str = "RSA ") -> str:
    lines = [rand(B64, 64, 40 + i) for i in range(6)]
    header = "-----" + "BEGIN " + kind + "PRIVATE KEY-----"
    footer = "-----" + "END " + kind + "PRIVATE KEY-----"
    return "\n".join([header, *lines, rand(B64, 20, 99) + "==", footer])


SECRET_PARTS = {
    "aws_access_key_id": "AKIA" + rand(UPPER_DIGITS, 16, 1),
    "gcp_api_key": "AI" + "za" + rand(URLSAFE, 35, 2),
    "github_token": "gh" + "p_" + rand(ALNUM, 36, 3),
    "github_oauth": "gh" + "o_" + rand(ALNUM, 36, 4),
    "github_server": "gh" + "s_" + rand(ALNUM, 36, 5),
    "github_pat": "github" + "_pat_" + rand(ALNUM, 22, 6) + "_" + rand(ALNUM, 59, 7),
    "slack_token": "xo" + "xb-" + rand(string.digits, 12, 8) + "-" + rand(ALNUM, 24, 9),
    "slack_user_token": "xo" + "xp-" + rand(string.digits, 12, 10) + "-" + rand(ALNUM, 32, 11),
    "slack_webhook": "https://hooks.slack.com/services/"
    + "T"
    + rand(UPPER_DIGITS, 8, 12)
    + "/B"
    + rand(UPPER_DIGITS, 8, 13)
    + "/"
    + rand(ALNUM, 24, 14),
    "openai_key": "s" + "k-" + rand(ALNUM, 48, 15),
    "openai_project_key": "s" + "k-proj-" + rand(URLSAFE, 120, 16),
    "anthropic_key": "s" + "k-ant-api03-" + rand(URLSAFE, 93, 17),
    "stripe_key": "s" + "k_live_" + rand(ALNUM, 24, 18),
    "stripe_restricted": "r" + "k_test_" + rand(ALNUM, 24, 19),
    "stripe_webhook": "wh" + "sec_" + rand(ALNUM, 32, 20),
    "jwt": jwt.encode({"sub": "user-1", "scope": "admin"}, "k" * 32, algorithm="HS256"),
    "private_key": pem_block(),
}

# (detector that must fire, text around the secret, the secret itself)
SAMPLES: list[tuple[str, str, str]] = [
    ("aws_access_key_id", "export AWS_ACCESS_KEY_ID={}\n", SECRET_PARTS["aws_access_key_id"]),
    (
        "gcp_api_key",
        "https://maps.googleapis.com/maps/api/js?key={}&v=3",
        SECRET_PARTS["gcp_api_key"],
    ),
    (
        "github_token",
        "git clone https://x-access-token:{}@github.com/o/r.git",
        SECRET_PARTS["github_token"],
    ),
    ("github_token", "GITHUB_TOKEN={}", SECRET_PARTS["github_oauth"]),
    ("github_token", "token: {}", SECRET_PARTS["github_server"]),
    ("github_token", '{{"token": "{}"}}', SECRET_PARTS["github_pat"]),
    ("slack_token", "SLACK_BOT_TOKEN={}", SECRET_PARTS["slack_token"]),
    ("slack_token", "xoxp token is {} ok", SECRET_PARTS["slack_user_token"]),
    ("slack_webhook", "post to {} please", SECRET_PARTS["slack_webhook"]),
    ("openai_key", "OPENAI_API_KEY={}", SECRET_PARTS["openai_key"]),
    ("openai_key", "key = '{}'", SECRET_PARTS["openai_project_key"]),
    ("anthropic_key", "ANTHROPIC_API_KEY={}", SECRET_PARTS["anthropic_key"]),
    ("stripe_key", 'stripe.api_key = "{}"', SECRET_PARTS["stripe_key"]),
    ("stripe_key", "restricted {} key", SECRET_PARTS["stripe_restricted"]),
    ("stripe_key", "STRIPE_WEBHOOK_SECRET={}", SECRET_PARTS["stripe_webhook"]),
    ("jwt", "cookie session={}; Path=/", SECRET_PARTS["jwt"]),
    ("private_key", "id_rsa contents:\n{}\nend of file", SECRET_PARTS["private_key"]),
    ("private_key", "{}", pem_block("OPENSSH ")),
    ("private_key", "{}", pem_block("")),
    ("private_key", "{}", pem_block("EC ")),
]

# Secrets that live inside a labelled context; only the value is redacted.
AWS_SECRET = rand(B64, 40, 30)
AZURE_KEY = rand(B64, 86, 31) + "=="
SAS_SIG = rand(ALNUM, 43, 32) + "%3D"
BEARER = rand(URLSAFE + ".", 40, 33)
CONTEXT_SAMPLES: list[tuple[str, str, str]] = [
    ("aws_secret_access_key", "aws_secret_access_key = " + AWS_SECRET + "\n", AWS_SECRET),
    ("aws_secret_access_key", '{"SecretAccessKey": "' + AWS_SECRET + '"}', AWS_SECRET),
    (
        "azure_storage_key",
        "DefaultEndpointsProtocol=https;AccountName=acct;AccountKey="
        + AZURE_KEY
        + ";EndpointSuffix=core.windows.net",
        AZURE_KEY,
    ),
    (
        "azure_sas_token",
        "https://acct.blob.core.windows.net/c/b.txt?sv=2022-11-02&sr=b&sig=" + SAS_SIG,
        SAS_SIG,
    ),
    ("bearer_token", "Authorization: Bearer " + BEARER, BEARER),
    ("bearer_token", "curl -H 'authorization: bearer " + BEARER + "' https://api", BEARER),
]

ORDINARY_TEXT = [
    "The quick brown fox jumps over the lazy dog. Meeting moved to 3pm on 2024-05-17.",
    "Install with pip install scikit-learn; see sk-learn-documentation-tutorial-pages for more.",
    "Commit 3f786850e387550fdab836ed7e6dc881de23001b fixed the task-management-dashboard bug.",
    "Request id 123e4567-e89b-12d3-a456-426614174000 took 1.25 s at 10.0.0.12:8080.",
    "The bearer of this letter is my friend; the token ring network is old technology.",
    "Version 1.2.3 ships on 2024-06-01; AKIA alone is not a key, nor is AIza.",
    "def handler(event, context):\n    return {'statusCode': 200, 'body': json.dumps(event)}\n",
    "Our SLA is 99.95% uptime; call the ask-me-anything session at room 4B.",
    "base64 of hello world is aGVsbG8gd29ybGQ= and that is fine",
    "-----BEGIN CERTIFICATE-----\nMIIB" + rand(B64, 60, 50) + "\n-----END CERTIFICATE-----",
    "Prices: 12 apples, 1500 oranges, year 2023, order #42.",
]


@pytest.fixture(params=["re2", "python"])
def engine(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def redactor(engine: str) -> Redactor:
    return Redactor(engine=engine)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("detector", "template", "secret"), SAMPLES, ids=[f"{s[0]}-{i}" for i, s in enumerate(SAMPLES)]
)
def test_detector_finds_and_replaces_secret(
    redactor: Redactor, detector: str, template: str, secret: str
) -> None:
    text = template.format(secret)
    counts: Counter[str] = Counter()
    out = redactor.redact(text, counts=counts)
    assert secret not in out
    assert f"[REDACTED:{detector}]" in out
    assert counts == {detector: 1}
    assert out == template.format(f"[REDACTED:{detector}]")


@pytest.mark.parametrize(
    ("detector", "text", "secret"),
    CONTEXT_SAMPLES,
    ids=[f"{s[0]}-{i}" for i, s in enumerate(CONTEXT_SAMPLES)],
)
def test_labelled_secret_value_is_redacted_and_label_kept(
    redactor: Redactor, detector: str, text: str, secret: str
) -> None:
    out = redactor.redact(text)
    assert secret not in out
    assert out == text.replace(secret, f"[REDACTED:{detector}]")


@pytest.mark.parametrize("text", ORDINARY_TEXT)
def test_ordinary_text_is_left_alone(engine: str, text: str) -> None:
    everything = Redactor(["secrets", "pii"], engine=engine)  # type: ignore[arg-type]
    assert everything.find(text) == []


def test_anthropic_key_is_not_reported_as_openai(redactor: Redactor) -> None:
    findings = redactor.find("k=" + SECRET_PARTS["anthropic_key"])
    assert [f.detector for f in findings] == ["anthropic_key"]


def test_unterminated_private_key_is_redacted_to_end_of_body(redactor: Redactor) -> None:
    block = pem_block()
    truncated = block[: block.index("-----END")]
    out = redactor.redact("key:\n" + truncated)
    assert out == "key:\n[REDACTED:private_key]"


def test_personal_data_is_opt_in(engine: str) -> None:
    text = "Write to jane.doe+work@mail.example.org or call +1 415-555-0100 today."
    assert Redactor(engine=engine).redact(text) == text  # type: ignore[arg-type]
    out = Redactor(["secrets", "pii"], engine=engine).redact(text)  # type: ignore[arg-type]
    assert out == "Write to [REDACTED:email] or call [REDACTED:phone] today."


@pytest.mark.parametrize(
    "phone", ["+44 20 7946 0958", "(415) 555-0100", "030 1234 5678", "+49 30 12345678"]
)
def test_phone_formats(engine: str, phone: str) -> None:
    out = Redactor(["phone"], engine=engine).redact(f"tel: {phone}.")  # type: ignore[arg-type]
    assert out == "tel: [REDACTED:phone]."


def test_json_values_and_keys_are_walked(redactor: Redactor) -> None:
    token = SECRET_PARTS["github_token"]
    key = SECRET_PARTS["openai_key"]
    value = {
        "repo": "octo/cat",
        "stars": 12,
        "secrets": [{"name": "ci", "value": "token " + token}, None, True],
        "nested": {"deep": {"deeper": [key]}},
        token: "used as a key",
    }
    counts: Counter[str] = Counter()
    out = redactor.redact_json(value, counts=counts)
    dumped = json.dumps(out)
    assert token not in dumped and key not in dumped
    assert out["repo"] == "octo/cat" and out["stars"] == 12
    assert out["secrets"] == [{"name": "ci", "value": "token [REDACTED:github_token]"}, None, True]
    assert out["nested"]["deep"]["deeper"] == ["[REDACTED:openai_key]"]
    assert out["[REDACTED:github_token]"] == "used as a key"
    assert counts == {"github_token": 2, "openai_key": 1}


def test_json_keys_that_collide_after_redaction_are_kept_apart(redactor: Redactor) -> None:
    a, b = SECRET_PARTS["github_token"], SECRET_PARTS["github_oauth"]
    out = redactor.redact_json({a: 1, b: 2})
    assert out == {"[REDACTED:github_token]": 1, "[REDACTED:github_token] #2": 2}


def test_mcp_content_blocks(redactor: Redactor) -> None:
    token = SECRET_PARTS["slack_token"]
    image_data = "iVBORw0KGgo" + SECRET_PARTS["openai_key"]  # binary stays binary
    result = {
        "content": [
            {"type": "text", "text": f"found {token}"},
            {"type": "image", "data": image_data, "mimeType": "image/png"},
            {"type": "resource", "resource": {"uri": "file:///env", "text": f"SLACK={token}"}},
        ],
        "structuredContent": {"token": token},
        "isError": False,
    }
    out = redactor.redact_mcp_result(result)
    assert out["content"][0] == {"type": "text", "text": "found [REDACTED:slack_token]"}
    assert out["content"][1]["data"] == image_data
    assert out["content"][2]["resource"] == {
        "uri": "file:///env",
        "text": "SLACK=[REDACTED:slack_token]",
    }
    assert out["structuredContent"] == {"token": "[REDACTED:slack_token]"}
    assert out["isError"] is False
    assert result["content"][0]["text"] == f"found {token}"  # the input is not modified


def test_custom_patterns_by_name_and_unknown_names_as_patterns() -> None:
    named = Redactor([], patterns={"ticket": r"INC-[0-9]{6}"})
    assert named.redact("see INC-123456 now") == "see [REDACTED:ticket] now"
    by_decision = Redactor.for_patterns(["github_token", r"internal-[a-z]{4}\.corp"])
    text = "host internal-abcd.corp token " + SECRET_PARTS["github_token"]
    assert by_decision.redact(text) == "host [REDACTED:custom] token [REDACTED:github_token]"
    assert Redactor.for_patterns([]).detectors == Redactor().detectors


def test_unsafe_or_unknown_configuration_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown redaction detector"):
        Redactor(["aws_keys_typo"])
    with pytest.raises(RegexError):
        Redactor([], patterns=[r"(a)\1"])
    with pytest.raises(RegexError):
        Redactor([], patterns=[r"(?<=x)y"])


def test_every_detector_is_exercised() -> None:
    covered = {d for d, _, _ in SAMPLES} | {d for d, _, _ in CONTEXT_SAMPLES} | {"email", "phone"}
    assert covered == set(DETECTORS)


# --- streams -----------------------------------------------------------------

STREAM_SECRETS = [
    SECRET_PARTS["github_token"],
    SECRET_PARTS["aws_access_key_id"],
    SECRET_PARTS["jwt"],
    SECRET_PARTS["private_key"],
    SECRET_PARTS["anthropic_key"],
    "Bearer " + BEARER,
    "aws_secret_access_key = " + AWS_SECRET,
]


def run_stream(redactor: Redactor, chunks: list[str]) -> tuple[str, list[str]]:
    stream = redactor.stream()
    outputs = [stream.feed(chunk) for chunk in chunks]
    outputs.append(stream.flush())
    return "".join(outputs), outputs


def secret_core(secret: str) -> str:
    """The part that must never appear: the value, without its label."""
    for label in ("Bearer ", "aws_secret_access_key = "):
        if secret.startswith(label):
            return secret[len(label) :]
    return secret


@pytest.mark.parametrize("secret", STREAM_SECRETS, ids=range(len(STREAM_SECRETS)))
def test_stream_catches_secret_split_at_every_position(redactor: Redactor, secret: str) -> None:
    text = f"before the secret {secret} and after it\n"
    expected = redactor.redact(text)
    assert secret_core(secret) not in expected
    for cut in range(1, len(text)):
        joined, outputs = run_stream(redactor, [text[:cut], text[cut:]])
        assert joined == expected, cut
        # no emitted piece holds a long enough fragment of the secret to matter
        assert all(secret_core(secret)[:12] not in piece for piece in outputs), cut


@settings(max_examples=60, deadline=None)
@given(
    secret_index=st.integers(min_value=0, max_value=len(STREAM_SECRETS) - 1),
    before=st.lists(
        st.sampled_from(["alpha", "beta", "x=1", "ok.", "\n", "{", "token:"]), max_size=6
    ),
    after=st.lists(st.sampled_from(["gamma", "done", "\n", "}", "."]), max_size=6),
    cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=12),
)
def test_stream_output_equals_one_shot_redaction(
    secret_index: int, before: list[str], after: list[str], cuts: list[int]
) -> None:
    redactor = Redactor()
    secret = STREAM_SECRETS[secret_index]
    text = " ".join([*before, secret, *after])
    points = sorted({c % (len(text) + 1) for c in cuts})
    chunks = [text[a:b] for a, b in zip([0, *points], [*points, len(text)], strict=True)]
    joined, _ = run_stream(redactor, chunks)
    assert joined == redactor.redact(text)
    assert secret_core(secret) not in joined


def test_stream_holds_back_only_the_trailing_word(redactor: Redactor) -> None:
    stream = redactor.stream()
    assert stream.feed("hello wor") == "hello "
    assert stream.pending == 3
    assert stream.feed("ld, all good. ") == "world, all good. "
    assert stream.pending == 0


def test_stream_holds_a_begun_private_key_until_its_end(redactor: Redactor) -> None:
    stream = redactor.stream()
    block = SECRET_PARTS["private_key"]
    head, body = block[:20], block[20:]
    assert stream.feed("key follows " + head) == "key follows "
    assert stream.feed(body[:100]) == ""
    assert stream.feed(body[100:] + "\nthanks ") == "[REDACTED:private_key]\nthanks "


def test_stream_hold_is_bounded(redactor: Redactor) -> None:
    stream = redactor.stream(max_hold=1000)
    out = stream.feed("x" * 5000)
    assert out == "x" * 4000 and stream.pending == 1000


# --- linear time ------------------------------------------------------------

PATHOLOGICAL = {
    "a": "a" * 1_000_000,
    "jwt-prefixes": "eyJ-" * 250_000,
    "jwt-segments": "eyJaaaaa." * 110_000,
    "sk-prefixes": "sk-" * 333_333,
    "pem-begins": ("-----BEGIN " + "PRIVATE KEY-----") * 37_000,
    "email-runs": ("x" * 64 + "@") * 15_000,
    "at-signs": "a@" * 500_000,
    "digits": "1 " * 500_000,
    "bearers": "bearer " * 140_000,
    "base64": rand(B64, 1_000_000, 77),
}


@pytest.mark.parametrize("name", list(PATHOLOGICAL))
def test_pathological_input_finishes_fast(engine: str, name: str) -> None:
    everything = Redactor(["secrets", "pii"], engine=engine)  # type: ignore[arg-type]
    started = time.perf_counter()
    everything.redact(PATHOLOGICAL[name])
    # A backtracking blow-up would take minutes; the bound is generous on purpose.
    assert time.perf_counter() - started < 5.0


def test_custom_nested_quantifier_pattern_stays_linear(engine: str) -> None:
    custom = Redactor([], patterns=[r"(a+)+b"], engine=engine)  # type: ignore[arg-type]
    text = "a" * (1_000_000 if engine == "re2" else 20_000)
    started = time.perf_counter()
    assert custom.redact(text) == text
    assert time.perf_counter() - started < 5.0


def test_block_placeholder_names_tool_and_reason() -> None:
    text = block_placeholder("web__fetch", "untrusted\nsource")
    assert text == '[Bastion blocked the output of "web__fetch": untrusted source]'
    assert block_placeholder(None) == "[Bastion blocked the output of a tool: blocked by policy]"


@pytest.mark.parametrize("pii", ["+44 20 7946 0958", "jane.doe@mail.example.org"])
def test_stream_catches_personal_data_split_at_every_position(engine: str, pii: str) -> None:
    redactor = Redactor(["pii"], engine=engine)  # type: ignore[arg-type]
    text = f"contact: {pii} thanks\n"
    expected = redactor.redact(text)
    assert pii not in expected
    for cut in range(1, len(text)):
        joined, _ = run_stream(redactor, [text[:cut], text[cut:]])
        assert joined == expected, cut
