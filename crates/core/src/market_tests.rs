//! Unit tests pinning wire names and error texts of `market` (each kills mutants
//! `make mutants` found surviving the original tests).

use super::*;

#[test]
fn availability_wire_names() {
    assert_eq!(Availability::Online.as_str(), "online");
    assert_eq!(Availability::Degraded.as_str(), "degraded");
    assert_eq!(Availability::Offline.as_str(), "offline");
}

#[test]
fn snapshot_errors_say_what_is_wrong() {
    let cases = [
        (SnapshotError::NotJson, "snapshot is not valid JSON"),
        (
            SnapshotError::Version("2".into()),
            "snapshot version is 2, expected 1",
        ),
        (
            SnapshotError::Field("offers"),
            "snapshot field `offers` is missing or invalid",
        ),
        (
            SnapshotError::NoValidOffers(3),
            "all 3 offers in the snapshot are invalid",
        ),
    ];
    for (e, text) in cases {
        assert_eq!(e.to_string(), text);
    }
}
