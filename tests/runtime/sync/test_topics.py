import pytest

from edge_sdk.errors import ConfigError
from edge_sdk.runtime.sync.topics import TopicKind, TopicMatch, Topics

SHA = "ab" * 32


def test_default_prefix_and_every_topic():
    t = Topics("plant1")
    assert t.prefix == "edge/plant1"
    assert t.status("d1") == "edge/plant1/d1/status"
    assert t.desired("d1") == "edge/plant1/d1/desired"
    assert t.desired() == "edge/plant1/desired"
    assert t.reported("d1") == "edge/plant1/d1/reported"
    assert t.manifest("cnn", 3) == "edge/plant1/releases/cnn/3/manifest"
    assert t.blob(SHA) == f"edge/plant1/blobs/{SHA}"
    assert t.telemetry("d1") == "edge/plant1/d1/telemetry"
    assert t.telemetry_ack("d1") == "edge/plant1/d1/telemetry/ack"
    assert t.telemetry_shared("workers") == "$share/workers/edge/plant1/+/telemetry"


def test_custom_prefix():
    t = Topics("f", prefix="acme/prod/fleet-f")
    assert t.telemetry("d") == "acme/prod/fleet-f/d/telemetry"
    assert t.parse("acme/prod/fleet-f/d/telemetry") == TopicMatch(TopicKind.TELEMETRY, device="d")
    assert t.parse("edge/f/d/telemetry") is None


def test_parse_round_trips():
    t = Topics("f")
    cases = {
        t.status("d"): TopicMatch(TopicKind.STATUS, device="d"),
        t.desired("d"): TopicMatch(TopicKind.DEVICE_DESIRED, device="d"),
        t.desired(): TopicMatch(TopicKind.FLEET_DESIRED),
        t.reported("d"): TopicMatch(TopicKind.REPORTED, device="d"),
        t.manifest("m", 12): TopicMatch(TopicKind.MANIFEST, model="m", version=12),
        t.pending("m", 12): TopicMatch(TopicKind.PENDING, model="m", version=12),
        t.blob(SHA): TopicMatch(TopicKind.BLOB, sha256=SHA),
        t.telemetry("d"): TopicMatch(TopicKind.TELEMETRY, device="d"),
        t.telemetry_ack("d"): TopicMatch(TopicKind.TELEMETRY_ACK, device="d"),
        t.trust_root(3): TopicMatch(TopicKind.TRUST_ROOT, version=3),
    }
    for topic, expected in cases.items():
        assert t.parse(topic) == expected, topic
    assert t.device_of(t.telemetry("cam-7"), TopicKind.TELEMETRY) == "cam-7"
    assert t.device_of(t.telemetry("cam-7"), TopicKind.STATUS) is None


@pytest.mark.parametrize(
    "topic",
    ["edge/f", "edge/f/", "edge/f/d", "edge/f/d/unknown", "edge/f//telemetry", "edge/g/d/telemetry",
     "edge/f/blobs/xyz", "edge/f/blobs/" + "AB" * 32, "edge/f/releases/m/v1/manifest", "edge/f/releases/m/1",
     "edge/f/d/telemetry/ack/x", "edge/f/desired/telemetry", "", "edge/f/+/telemetry", "edge/f/trust/root/v2",
     "edge/f/trust/status"],
)
def test_parse_rejects_foreign_topics(topic):
    assert Topics("f").parse(topic) is None


@pytest.mark.parametrize("bad", ["", "a/b", "a+b", "#", "$SYS", "x\0"])
def test_bad_names_are_config_errors(bad):
    with pytest.raises(ConfigError):
        Topics(bad)
    with pytest.raises(ConfigError):
        Topics("f").telemetry(bad)
    with pytest.raises(ConfigError):
        Topics("f").telemetry_shared(bad)


def test_reserved_device_ids_and_bad_versions_and_shas():
    t = Topics("f")
    for word in ("desired", "releases", "blobs", "trust"):
        with pytest.raises(ConfigError, match="reserved"):
            t.status(word)
    for version in (-1, "3", 1.5, True):
        with pytest.raises(ConfigError, match="version"):
            t.manifest("m", version)
    with pytest.raises(ConfigError, match="sha256"):
        t.blob("AB" * 32)
    with pytest.raises(ConfigError, match="prefix"):
        Topics("f", prefix="edge//x")
