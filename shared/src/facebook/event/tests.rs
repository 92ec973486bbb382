//! Tests of the event model against the fixtures: splitting, kinds, identities, both fact paths.

use super::*;
use crate::jobs::JobKind;
use serde_json::Value;

const PAGE: &str = "510249619162304";
const USER: &str = "1066835436691078";

/// A webhook delivery from the repository's tests/fixtures/messenger, byte for byte.
fn fixture(name: &str) -> Vec<u8> {
    let path = format!(
        "{}/../tests/fixtures/messenger/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read(&path).unwrap_or_else(|e| panic!("fixture {path}: {e}"))
}

#[test]
fn a_kind_as_a_number_is_its_place_in_the_list_of_all_kinds() {
    for (place, &kind) in EventKind::ALL.iter().enumerate() {
        assert_eq!(kind as usize, place, "{kind:?}");
    }
}

#[test]
fn every_fixture_splits_into_one_event_of_the_right_kind() {
    let cases = [
        (
            "message.json",
            EventKind::Message,
            "mid:mid.1468152703527:6600c706f15a292027",
        ),
        (
            "echo.json",
            EventKind::Echo,
            "mid:mid.1468152706286:e7982eb7618034a075",
        ),
        (
            "delivery.json",
            EventKind::Delivery,
            "delivery:1468152706921",
        ),
        ("read.json", EventKind::Read, "read:1468152706921"),
        (
            "quick_reply.json",
            EventKind::Message,
            "mid:mid.1457764197618:41d102a3e1ae206a38",
        ),
    ];
    for (name, kind, id) in cases {
        let events = split_delivery(&fixture(name), 1).expect(name);
        assert_eq!(events.len(), 1, "{name}");
        assert_eq!(events[0].kind, kind, "{name}");
        assert_eq!(events[0].event_id, id, "{name}");
        assert_eq!(events[0].user_psid.as_deref(), Some(USER), "{name}");
        assert_eq!(events[0].page_id, PAGE);
    }
    let postback = split_delivery(&fixture("postback.json"), 1).expect("postback");
    assert_eq!(postback[0].kind, EventKind::Postback);
    assert!(postback[0].event_id.starts_with("hash:"));
    let change = split_delivery(&fixture("page_change.json"), 1).expect("change");
    assert_eq!(change[0].kind, EventKind::PageChange);
    assert_eq!(JobKind::of_event(change[0].kind), JobKind::PageChange);
}

#[test]
fn raw_event_text_is_kept_byte_for_byte() {
    let events = split_delivery(&fixture("echo.json"), 1).expect("echo");
    assert!(events[0].event.get().contains(r"abecad\u0142o"));
}

#[test]
fn a_batch_gives_one_message_per_event() {
    let body = r#"{"object":"page","entry":[
          {"id":"1","time":1,"messaging":[
             {"sender":{"id":"u1"},"recipient":{"id":"1"},"timestamp":5,"message":{"mid":"m1","text":"a"}},
             {"sender":{"id":"u2"},"recipient":{"id":"1"},"timestamp":6,"message":{"mid":"m2","text":"b"}}]},
          {"id":"2","time":1,"standby":[
             {"sender":{"id":"u3"},"recipient":{"id":"2"},"timestamp":7,"message":{"mid":"m3","text":"c"}}],
           "changes":[{"field":"name","value":"x"}]}]}"#.to_string();
    let events = split_delivery(body.as_bytes(), 1).expect("valid");
    let ids: Vec<_> = events
        .iter()
        .map(|e| (e.page_id.as_str(), e.event_id.as_str(), e.standby))
        .collect();
    assert_eq!(ids.len(), 4);
    assert_eq!(ids[0], ("1", "mid:m1", false));
    assert_eq!(ids[2], ("2", "mid:m3", true));
    assert!(ids[3].1.starts_with("change:"));
}

#[test]
fn bad_bodies_are_refused() {
    assert!(matches!(
        split_delivery(b"nope", 1),
        Err(DeliveryError::NotJson(_))
    ));
    assert_eq!(
        split_delivery(br#"{"object":"user","entry":[]}"#, 1).err(),
        Some(DeliveryError::NotPage("\"user\"".into()))
    );
}

/// The keys-only reading gives the `Value` path's facts for every shape, and settles the
/// usual ones by itself.
#[test]
fn facts_from_the_text_are_the_facts_from_the_value() {
    let usual = [
        r#"{"sender":{"id":"u"},"recipient":{"id":"p"},"timestamp":5,"message":{"mid":"m","text":"a"}}"#,
        r#"{"sender":{"id":"u"},"recipient":{"id":"p"},"timestamp":1492414608999.0,"reaction":{"mid":"m","action":"react","reaction":"love"}}"#,
        r#"{"sender":{"id":"p"},"recipient":{"id":"u"},"timestamp":5,"message":{"mid":"m","is_echo":true}}"#,
        r#"{"sender":{"id":"u"},"recipient":{"id":"p"},"timestamp":5,"message":{"mid":"\u0041b","is_echo":"true"}}"#,
        r#"{"sender":{"id":7},"recipient":{"id":1.5},"timestamp":5.5,"message":{"mid":12}}"#,
        r#"{"sender":{"id":"u"},"recipient":{"id":"p"},"timestamp":9,"postback":{"mid":"pb","title":"x"}}"#,
        r#"{"sender":{"id":"u"},"timestamp":9,"reaction":{"mid":"m","action":"react","reaction":"love"}}"#,
        r#"{"sender":{"id":"u"},"timestamp":9,"reaction":{"mid":"m","reaction":{"x":1}}}"#,
        r#"{"sender":{"id":"u"},"message_edit":{"mid":"m","num_edit":2}}"#,
        r#"{"sender":{"id":"u"},"delivery":{"mids":["a"],"watermark":1468152706921}}"#,
        r#"{"sender":{"id":"u"},"delivery":{"watermark":"1e3"}}"#,
        r#"{"sender":{"id":"u"},"delivery":{"watermark":null}}"#,
        r#"{"sender":{"id":"u"},"delivery":{"watermark":{"b":1, "a":[2]}}}"#,
        r#"{"sender":{"id":"u"},"delivery":[1],"read":{"watermark":1e3}}"#,
        r#"{"sender":{"id":"u"},"delivery":{"seq":1},"read":{"watermark":-0}}"#,
    ];
    let unusual = [
        // No person by id: a `user_ref`, the Page's own thread, or nobody.
        r#"{"sender":{"id":null},"recipient":["p"],"timestamp":"5","message":{"mid":"m"}}"#,
        r#"{"sender":{"id":"p"},"recipient":{"id":"p"},"message":{"mid":"m"},"postback":{}}"#,
        r#"{"sender":{"user_ref":"guest-1"},"recipient":{"id":"p"},"message":{"mid":"m"}}"#,
        r#"{"recipient":{"id":"p"},"timestamp":3,"policy_enforcement":{"action":"block"}}"#,
        r#"{"sender":{"id":"u"},"message":null}"#,
        r#"{"sender":{"id":"u"},"message":"m"}"#,
        r#"{"sender":{"id":"u"},"message":["m"]}"#,
        r#"{"sender":{"id":"u"},"message":{"text":"no mid"}}"#,
        r#"{"sender":{"id":"u"},"message":{"mid":"a"},"message":{"mid":"b"}}"#,
        r#"{"sender":{"id":"u"},"message":{"mid":"a","mid":"b"}}"#,
        r#"{"sender":{"id":"u"},"sender":{"id":"v"},"message":{"mid":"a"}}"#,
        r#"{"sender":{"id":"u","id":"v"},"message":{"mid":"a"}}"#,
        r#"{"sender":{"id":"u"},"postback":{"title":"no mid"}}"#,
        r#"{"sender":{"id":"u"},"postback":null}"#,
        r#"{"sender":{"id":"u"},"reaction":{"action":"react"}}"#,
        r#"{"sender":{"id":"u"},"message_edit":{"mid":"m"}}"#,
        r#"{"sender":{"id":"u"},"delivery":{"seq":1}}"#,
        r#"{"sender":{"id":"u"},"referral":{"ref":"x"}}"#,
        r#"{"sender":{"id":"u"},"optin":{"ref":"x"}}"#,
        r#"{"sender":{"id":"u"},"pass_thread_control":{}}"#,
        r#"{"sender":{"id":"u"},"something_new":{}}"#,
        r#"["sender","message"]"#,
        r#"{}"#,
        r#"null"#,
        r#"3"#,
    ];
    let fixtures = [
        "message.json",
        "echo.json",
        "delivery.json",
        "read.json",
        "quick_reply.json",
        "postback.json",
        "message_edit.json",
    ];
    let mut fixture_events = Vec::new();
    for name in fixtures {
        let body: Value = serde_json::from_slice(&fixture(name)).expect(name);
        for event in body["entry"][0]["messaging"].as_array().expect(name) {
            fixture_events.push(event.to_string());
        }
    }
    let all = usual
        .iter()
        .chain(&unusual)
        .map(|text| text.to_string())
        .chain(fixture_events);
    for text in all {
        let raw = RawValue::from_string(text.clone()).expect("valid JSON");
        let value: Value = serde_json::from_str(&text).expect("valid JSON");
        for page in [PAGE, "p", "u"] {
            assert_eq!(
                EventFacts::of_raw(page, &raw),
                EventFacts::of(page, &value),
                "{text}"
            );
        }
    }
    for text in usual {
        let raw = RawValue::from_string(text.to_string()).expect("valid JSON");
        assert!(EventFacts::of_keys("p", &raw).is_some(), "{text}");
    }
    for text in unusual {
        let raw = RawValue::from_string(text.to_string()).expect("valid JSON");
        assert!(EventFacts::of_keys("p", &raw).is_none(), "{text}");
    }
}

/// Times written with a fraction (`1492414608999.0`) were refused with 400 (the entry's
/// `time`) or read as 0 (an event's `timestamp`): Facebook would retry, then disable the Page.
/// They are read by their whole part, and the event's text keeps them as sent; an integer
/// time gives a Page change the identity it had.
#[test]
fn a_time_written_with_a_fraction_is_read_and_kept_as_sent() {
    let body = r#"{"object":"page","entry":[{"id":"1","time":1492414608.0,"messaging":[{"sender":{"id":"u"},"recipient":{"id":"1"},"timestamp":1492414608999.0,"message":{"mid":"m_f","text":"a"}}],"changes":[{"field":"name","value":"Shop"}]}]}"#;
    let events = split_delivery(body.as_bytes(), 1).expect("accepted");
    assert_eq!(events.len(), 2);
    assert_eq!(events[0].timestamp_ms, 1_492_414_608_999);
    assert!(events[0].event.get().contains("1492414608999.0"));
    assert_eq!(events[1].kind, EventKind::PageChange);
    assert_eq!(events[1].timestamp_ms, 1_492_414_608_000);
    let integer = r#"{"object":"page","entry":[{"id":"1","time":5,"changes":[{"field":"name","value":"Shop"}]}]}"#;
    let change = split_delivery(integer.as_bytes(), 1).expect("accepted");
    let before = Identity::Change(canonical_hash(
        &serde_json::json!({ "time": 5, "change": {"field":"name","value":"Shop"} }),
    ));
    assert_eq!(change[0].event_id, before.to_string());
}

#[test]
fn envelopes_read_as_before() {
    let split = |body: &str| split_delivery(body.as_bytes(), 1);
    let ids = |body: &str| -> Vec<String> {
        split(body)
            .expect(body)
            .into_iter()
            .map(|e| e.page_id)
            .collect()
    };
    assert_eq!(
        ids(
            r#"{"object":"page","entry":[{"id":"1","messaging":[{}]},{"id":2,"changes":[{}]},{"id":"\u0033","standby":[{}]}]}"#
        ),
        ["1", "2", "3"]
    );
    assert!(matches!(
        split(r#"{"object":"page","entry":[{"id":null,"messaging":[{}]}]}"#),
        Err(DeliveryError::BadId(_))
    ));
    assert_eq!(
        ids(r#"{"object":"p\u0061ge","entry":[]}"#),
        Vec::<String>::new()
    );
    assert_eq!(ids(r#"{"object":"page"}"#), Vec::<String>::new());
    assert_eq!(
        split(r#"{"object":{"a": 1}}"#).err(),
        Some(DeliveryError::NotPage(r#"{"a":1}"#.into()))
    );
    for refused in [
        r#"{"entry":[]}"#,
        r#"{"object":"page","entry":[{"time":1}]}"#,
        r#"{"object":"page","object":"page"}"#,
        r#"{"object":"page","entry":null}"#,
        r#"{"object":"page","entry":[{"id":"1","messaging":null}]}"#,
    ] {
        assert!(
            matches!(split(refused), Err(DeliveryError::NotJson(_))),
            "{refused}"
        );
    }
}

#[test]
fn canonical_hash_ignores_key_order_and_escapes() {
    let a: Value = serde_json::from_str(r#"{"a":1,"b":"\u00e4"}"#).expect("json");
    let b: Value = serde_json::from_str(r#"{"b":"ä","a":1}"#).expect("json");
    assert_eq!(canonical_hash(&a), canonical_hash(&b));
}

#[test]
fn react_unreact_react_again_are_three_events_and_a_retry_is_one() {
    let reaction = |timestamp: i64, action: &str| {
        serde_json::json!({"sender":{"id":"u"},"recipient":{"id":"p"},"timestamp":timestamp,
            "reaction":{"mid":"m_1","action":action,"reaction":"love"}})
    };
    let ids: Vec<String> = [(1, "react"), (2, "unreact"), (3, "react")]
        .iter()
        .map(|(t, action)| EventFacts::of("p", &reaction(*t, action)).identity)
        .collect();
    assert_eq!(
        ids.iter().collect::<std::collections::HashSet<_>>().len(),
        3,
        "{ids:?}"
    );
    // Facebook retrying the same delivery: the same event, the same identity.
    assert_eq!(EventFacts::of("p", &reaction(1, "react")).identity, ids[0]);
    // Reactions without a mid do not collapse into one.
    let no_mid = |timestamp: i64| {
        serde_json::json!({"sender":{"id":"u"},"recipient":{"id":"p"},"timestamp":timestamp,
            "reaction":{"action":"react","reaction":"like"}})
    };
    assert_ne!(
        EventFacts::of("p", &no_mid(1)).identity,
        EventFacts::of("p", &no_mid(2)).identity
    );
}

#[test]
fn each_edit_of_a_message_is_its_own_event() {
    let events = split_delivery(&fixture("message_edit.json"), 1).expect("edit");
    assert_eq!(events[0].kind, EventKind::Edit);
    assert_eq!(
        events[0].event_id,
        "edit:mid.1468152703527:6600c706f15a292027:1"
    );
    let edit = |num_edit: i64| {
        serde_json::json!({"sender":{"id":"u"},"recipient":{"id":"p"},"timestamp":num_edit,
            "message_edit":{"mid":"m_1","text":format!("v{num_edit}"),"num_edit":num_edit}})
    };
    assert_ne!(
        EventFacts::of("p", &edit(1)).identity,
        EventFacts::of("p", &edit(2)).identity
    );
    assert_ne!(
        EventFacts::of("p", &edit(1)).identity,
        EventFacts::of(
            "p",
            &serde_json::json!({"sender":{"id":"u"},"recipient":{"id":"p"},
            "timestamp":1,"message":{"mid":"m_1","text":"v0"}})
        )
        .identity,
        "the edit and the message are both kept"
    );
}

/// A delivery of one message from `user` to `page`, its text nested `depth` arrays deep.
fn delivery_with(page: &str, user: &str, depth: usize) -> Vec<u8> {
    let nested = format!("{}\"x\"{}", "[".repeat(depth), "]".repeat(depth));
    format!(
        r#"{{"object":"page","entry":[{{"id":"{page}","time":1,"messaging":[{{"sender":{{"id":"{user}"}},"recipient":{{"id":"{page}"}},"timestamp":2,"message":{{"mid":"m_1","text":"a [ {{ \" ] in a string","deep":{nested}}}}}]}}]}}"#
    )
    .into_bytes()
}

#[test]
fn a_delivery_nested_deeper_than_the_limit_is_refused_whole() {
    // The envelope and the event take 6 levels; the text's brackets do not count.
    assert_eq!(
        split_bytes(&delivery_with(PAGE, USER, MAX_JSON_DEPTH - 6)).map(|e| e.len()),
        Ok(1)
    );
    assert_eq!(
        split_bytes(&delivery_with(PAGE, USER, 20_000)).err(),
        Some(DeliveryError::TooDeep)
    );
}

#[test]
fn ids_that_are_not_ids_refuse_the_delivery_and_are_shown_shortened() {
    let long = "1".repeat(200_000);
    let Err(DeliveryError::BadId(refused)) = split_bytes(&delivery_with(&long, USER, 1)) else {
        panic!("a 200,000-digit page id was accepted");
    };
    assert_eq!(refused.what, "page id");
    assert_eq!(refused.value.len(), 100);
    assert!(matches!(
        split_bytes(&delivery_with(PAGE, "../x", 1)),
        Err(DeliveryError::BadId(_))
    ));
}

#[test]
fn more_events_than_the_cap_refuse_the_delivery() {
    let event = format!(
        r#"{{"sender":{{"id":"{USER}"}},"recipient":{{"id":"{PAGE}"}},"timestamp":2,"message":{{"mid":"m_1","text":"x"}}}}"#
    );
    let body = |events: usize| {
        let events = vec![event.as_str(); events].join(",");
        format!(
            r#"{{"object":"page","entry":[{{"id":"{PAGE}","time":1,"messaging":[{events}]}}]}}"#
        )
        .into_bytes()
    };
    assert_eq!(
        split_bytes(&body(MAX_EVENTS_PER_DELIVERY)).map(|e| e.len()),
        Ok(MAX_EVENTS_PER_DELIVERY)
    );
    assert_eq!(
        split_bytes(&body(MAX_EVENTS_PER_DELIVERY + 1)).err(),
        Some(DeliveryError::TooManyEvents(MAX_EVENTS_PER_DELIVERY + 1))
    );
}

fn split_bytes(body: &[u8]) -> Result<Vec<EventMessage>, DeliveryError> {
    split_delivery(body, 1)
}

/// Events that name no person by id are placed all the same: a plugin's `user_ref` names a
/// conversation of its own, and an event of the Page alone goes to the Page's own thread; only
/// an event with neither a person nor the Page has no place.
#[test]
fn events_without_a_person_by_id_are_placed_by_user_ref_or_on_the_pages_own_thread() {
    let partner = |text: &str| {
        let value: Value = serde_json::from_str(text).expect("json");
        EventFacts::of(PAGE, &value).user_psid
    };
    assert_eq!(
        partner(&format!(
            r#"{{"recipient":{{"id":"{PAGE}"}},"timestamp":1,"optin":{{"ref":"r","user_ref":"cb-42"}}}}"#
        )),
        Some("user_ref_cb-42".into())
    );
    assert_eq!(
        partner(&format!(
            r#"{{"sender":{{"user_ref":"guest_7"}},"recipient":{{"id":"{PAGE}"}},"message":{{"mid":"m"}}}}"#
        )),
        Some("user_ref_guest_7".into())
    );
    for page_level in [
        format!(
            r#"{{"recipient":{{"id":"{PAGE}"}},"timestamp":1,"policy_enforcement":{{"action":"block","reason":"r"}}}}"#
        ),
        format!(
            r#"{{"recipient":{{"id":"{PAGE}"}},"timestamp":1,"app_roles":{{"123":["primary_receiver"]}}}}"#
        ),
    ] {
        assert_eq!(
            partner(&page_level),
            Some("page_events".into()),
            "{page_level}"
        );
    }
    assert_eq!(partner(r#"{"timestamp":1,"something":{}}"#), None);
    // A ref of any shape has a thread of its own; an id that reads as a reserved thread names
    // nobody.
    let odd = partner(&format!(
        r#"{{"recipient":{{"id":"{PAGE}"}},"optin":{{"user_ref":"0.k3j/9+x=={}"}}}}"#,
        "z".repeat(80)
    ))
    .expect("a thread");
    assert!(
        odd.starts_with("user_ref_") && odd.len() == "user_ref_".len() + 32,
        "{odd}"
    );
    assert!(crate::ids::Psid::parse(&odd).is_ok());
    for reserved in ["page_events", "user_ref_someone"] {
        assert_eq!(
            partner(&format!(
                r#"{{"sender":{{"id":"{reserved}"}},"recipient":{{"id":"x"}},"message":{{"mid":"m"}}}}"#
            )),
            None,
            "{reserved} names nobody"
        );
    }
}
