use std::time::Duration;

use super::*;

const FULL: &str = r#"
version: 1
env: { CARGO_TERM_COLOR: always }
matrix:
  rust: ["1.85", "stable"]
steps:
  - name: build
    image: "rust:${rust}"
    commands: ["cargo build --locked"]
  - name: test
    depends_on: [build]
    commands: ["cargo test", "echo ${HOME} ${rust}"]
    env: { RUST_LOG: debug }
    agents: { os: linux }
    timeout: 30m
    retry: { limit: 2, on: [agent_lost, failure] }
    when: { branch: [main, "release/*"], event: [push, manual] }
    allow_failure: false
  - name: lint
    depends_on: []
    image: "rust:${rust}"
    services:
      cache: { image: "redis:7" }
    commands: ["cargo clippy"]
"#;

fn error(text: &str) -> PipelineError {
    match parse(text) {
        Ok(p) => panic!("parsed: {p:?}"),
        Err(e) => e,
    }
}

fn names(p: &Pipeline) -> Vec<&str> {
    p.steps.iter().map(|s| s.name.as_str()).collect()
}

#[test]
fn the_full_example_expands_per_matrix_combination() {
    let p = parse(FULL).unwrap();
    assert_eq!(
        names(&p),
        [
            "build (rust=1.85)",
            "build (rust=stable)",
            "test (rust=1.85)",
            "test (rust=stable)",
            "lint (rust=1.85)",
            "lint (rust=stable)"
        ]
    );
    let test = &p.steps[2];
    assert_eq!(test.base, "test");
    assert_eq!(test.depends_on, ["build (rust=1.85)"]);
    assert_eq!(test.commands, ["cargo test", "echo ${HOME} 1.85"]);
    assert_eq!(test.env["CARGO_TERM_COLOR"], "always");
    assert_eq!(test.env["RUST_LOG"], "debug");
    assert_eq!(test.labels, Labels::parse(["os=linux"]).unwrap());
    assert_eq!(test.timeout, Some(Duration::from_secs(1800)));
    assert_eq!(test.retry.limit, 2);
    assert_eq!(test.retry.on, [RetryOn::AgentLost, RetryOn::Failure]);
    assert_eq!(test.when.event, [Trigger::Push, Trigger::Manual]);
    assert_eq!(test.image, None);
    assert_eq!(p.steps[0].image.as_ref().unwrap().as_str(), "rust:1.85");
    let lint = &p.steps[5];
    assert!(lint.depends_on.is_empty());
    assert_eq!(lint.services[0].name, "cache");
    assert_eq!(lint.services[0].image.as_str(), "redis:7");
    let served = parse(
        "version: 1\nmatrix: {v: [\"7\"]}\nsteps:\n  - name: a\n    image: x\n    commands: [x]\n    services:\n      cache: {image: \"redis:${v}\", env: {V: \"${v}\"}, command: [redis-server, --port, \"6380\"]}\n",
    )
    .unwrap();
    let cache = &served.steps[0].services[0];
    assert_eq!(cache.image.as_str(), "redis:7");
    assert_eq!(cache.env.get("V").map(String::as_str), Some("7"));
    assert_eq!(cache.command, ["redis-server", "--port", "6380"]);
    assert_eq!(lint.matrix["rust"], "stable");
}

#[test]
fn steps_wait_for_the_previous_one_unless_told() {
    let p = parse("version: 1\nsteps:\n  - {name: a, commands: [x]}\n  - {name: b, commands: [x]}\n  - {name: c, depends_on: [], commands: [x]}\n  - {name: d, depends_on: [a, c], commands: [x]}\n").unwrap();
    let deps: Vec<Vec<String>> = p.steps.iter().map(|s| s.depends_on.clone()).collect();
    assert_eq!(names(&p), ["a", "b", "c", "d"]);
    assert_eq!(
        deps,
        [
            vec![],
            vec!["a".to_owned()],
            vec![],
            vec!["a".to_owned(), "c".to_owned()]
        ]
    );
}

#[test]
fn steps_come_out_after_what_they_wait_for() {
    let p = parse("version: 1\nsteps:\n  - {name: last, depends_on: [first], commands: [x]}\n  - {name: first, depends_on: [], commands: [x]}\n").unwrap();
    assert_eq!(names(&p), ["first", "last"]);
}

#[test]
fn errors_name_the_line_and_column_and_what_was_expected() {
    let cases: &[(&str, (u64, u64), &str)] = &[
        ("version: 1\nsteps:\n  - name: a\n    comands: [x]\n", (4, 5), "unknown field `comands`, expected one of"),
        ("version: 2\nsteps: []\n", (1, 10), "version 2 is not known: expected 1"),
        ("version: one\nsteps: []\n", (1, 10), "u32"),
        ("version: 1\nsteps: []\n", (2, 8), "at least one step"),
        ("version: 1\nsteps:\n  - name: a\n    commands: x\n", (4, 15), "sequence"),
        ("version: 1\nsteps: [\n", (2, 8), "unclosed"),
        ("version: 1\nversion: 1\nsteps: []\n", (2, 1), "duplicate mapping key: version"),
        (
            "version: 1\nsteps:\n  - {name: a, commands: [x]}\n  - {name: b, depends_on: [nope], commands: [x]}\n",
            (4, 28),
            "step \"b\" depends on \"nope\", which is not a step",
        ),
        (
            "version: 1\nsteps:\n  - {name: a, commands: [x]}\n  - {name: a, commands: [y]}\n",
            (4, 12),
            "used twice",
        ),
        (
            "version: 1\nsteps:\n  - {name: a, depends_on: [b], commands: [x]}\n  - {name: b, depends_on: [a], commands: [x]}\n",
            (3, 12),
            "cycle: a -> b -> a",
        ),
        ("version: 1\nsteps:\n  - {name: a, depends_on: [a], commands: [x]}\n", (3, 28), "depends on itself"),
        ("version: 1\nsteps:\n  - {name: 'a b', commands: [x]}\n", (3, 12), "step name \"a b\""),
        ("version: 1\nsteps:\n  - {name: a, commands: []}\n", (3, 25), "at least one command"),
        (
            "version: 1\nsteps:\n  - {name: a, commands: [x], timeout: soon}\n",
            (3, 39),
            "timeout \"soon\": expected a duration",
        ),
        (
            "version: 1\nsteps:\n  - {name: a, commands: [x], retry: {limit: 99}}\n",
            (3, 37),
            "limit 99 is over 10",
        ),
        (
            "version: 1\nsteps:\n  - name: a\n    commands: [x]\n    services:\n      db: {image: postgres}\n",
            (6, 7),
            "only a step with an image has services",
        ),
        (
            "version: 1\nsteps:\n  - name: a\n    image: x\n    commands: [x]\n    services:\n      db: {image: postgres, env: {\"A B\": x}}\n",
            (7, 34),
            "env: \"A B\" is not a variable name",
        ),
        (
            "version: 1\nsteps:\n  - name: a\n    image: x\n    commands: [x]\n    services:\n      db.x: {image: postgres}\n",
            (7, 7),
            "services: \"db.x\" is not a host name",
        ),
        (
            "version: 1\nsteps:\n  - {name: a, commands: [x], image: \"-rm\"}\n",
            (3, 37),
            "not an image reference",
        ),
        (
            "version: 1\nsteps:\n  - {name: a, commands: [x], when: {event: [sometimes]}}\n",
            (3, 45),
            "unknown variant `sometimes`, expected one of push, pull_request, tag, manual, api",
        ),
        (
            "version: 1\nsteps:\n  - {name: a, commands: [x], agents: {os: 'has space'}}\n",
            (3, 38),
            "agents: invalid labels",
        ),
        ("", (1, 1), "unexpected end of input"),
        ("- a\n", (1, 1), "mapping"),
    ];
    let mut wrong = Vec::new();
    for (text, (line, column), wanted) in cases {
        let e = error(text);
        if !e.message.contains(wanted)
            || (e.line, e.column) != (*line, *column)
            || e.message.contains("DuplicateKeyPolicy")
        {
            wrong.push(format!(
                "{text:?}\n  wanted {line}:{column}: ...{wanted}...\n  got    {e}"
            ));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn a_matrix_over_its_cap_is_an_error_never_a_silent_cut() {
    let e = error("version: 1\nmatrix:\n  a: [1, 2, 3, 4, 5]\n  b: [1, 2, 3, 4, 5]\n  c: [1, 2, 3]\nsteps:\n  - {name: a, commands: [x]}\n");
    assert!(e.message.contains("75 combinations: at most 64"), "{e}");
    assert_eq!((e.line, e.column), (3, 3));
    // Exactly at the cap is fine.
    let p = parse("version: 1\nmatrix:\n  a: [1, 2, 3, 4, 5, 6, 7, 8]\n  b: [1, 2, 3, 4, 5, 6, 7, 8]\nsteps:\n  - {name: a, commands: [x]}\n").unwrap();
    assert_eq!(p.steps.len(), 64);
    // A product that would overflow is caught before it is built.
    let keys: String = (0..40)
        .map(|i| format!("  k{i}: [1, 2, 3, 4, 5, 6, 7, 8, 9]\n"))
        .collect();
    let e = error(&format!(
        "version: 1\nmatrix:\n{keys}steps:\n  - {{name: a, commands: [x]}}\n"
    ));
    assert!(e.message.contains("combinations: at most 64"), "{e}");
}

#[test]
fn hostile_files_get_a_clear_error_quickly() {
    // 10 MB.
    let big = format!(
        "version: 1\nsteps:\n{}",
        "  - {name: a, commands: [x]}\n".repeat(400_000)
    );
    assert!(big.len() > 10_000_000);
    let e = error(&big);
    assert!(e.message.contains("at most 524288 are read"), "{e}");
    // 10,000 levels of nesting, in flow and in block style.
    let flow = format!(
        "version: 1\nsteps: {}{}\n",
        "[".repeat(10_000),
        "]".repeat(10_000)
    );
    assert!(error(&flow).message.contains("limit"), "{}", error(&flow));
    let block = format!("version: 1\nsteps:\n  {}x\n", "- ".repeat(10_000));
    let e = error(&block);
    assert_eq!((e.line, e.message.as_str()), (3, "expected mapping start"), "{e}");
    let maps = format!(
        "version: 1\nenv: {}{}\nsteps: []\n",
        "{a: ".repeat(10_000),
        "}".repeat(10_000)
    );
    assert!(error(&maps).line == 2, "{}", error(&maps));
    // Aliases: a small file that would expand to megabytes of commands.
    let refs = vec!["*s"; 5_000].join(", ");
    let bomb = format!(
        "version: 1\nsteps:\n  - name: a\n    env: {{X: &s {}}}\n    commands: [{refs}]\n",
        "y".repeat(1_000)
    );
    assert!(bomb.len() < caps::MAX_FILE);
    let e = error(&bomb);
    assert!(e.message.contains("budget") && e.line == 5, "{e}");
}

/// Random damage to a valid file: the parser answers (a pipeline or an
/// error with a position), and never panics.
#[test]
fn damaged_files_never_panic() {
    let mut rng = fastrand::Rng::with_seed(0x5eed);
    let tokens = [
        "- ",
        ": ",
        "[",
        "]",
        "{",
        "}",
        "&a ",
        "*a",
        "\n",
        "  ",
        "'",
        "\"",
        "#",
        "!!str ",
        "${rust}",
        "depends_on",
        "name",
        "steps",
        "matrix",
        "|\n",
        "? ",
        "\t",
        "\u{feff}",
        "~",
    ];
    for _ in 0..3_000 {
        let mut text: Vec<char> = FULL.chars().collect();
        for _ in 0..rng.usize(1..6) {
            let at = rng.usize(0..=text.len());
            match rng.u8(0..3) {
                0 if at < text.len() => {
                    text.remove(at);
                }
                1 => {
                    let t = tokens[rng.usize(0..tokens.len())];
                    for (k, c) in t.chars().enumerate() {
                        text.insert(at + k, c);
                    }
                }
                _ => {
                    let end = (at + rng.usize(0..40)).min(text.len());
                    text.drain(at..end);
                }
            }
        }
        let text: String = text.into_iter().collect();
        if let Err(e) = parse(&text) {
            assert!(!e.message.is_empty());
        }
    }
}

#[test]
fn when_selects_steps_and_keeps_the_order_of_the_rest() {
    let p = parse(
        "version: 1\nsteps:\n  - {name: a, commands: [x]}\n  - {name: b, commands: [x], when: {branch: [main]}}\n  - {name: c, commands: [x]}\n",
    )
    .unwrap();
    let main = p.select(Some("main"), Trigger::Push);
    assert_eq!(names(&main), ["a", "b", "c"]);
    let topic = p.select(Some("topic"), Trigger::Push);
    assert_eq!(names(&topic), ["a", "c"]);
    assert_eq!(topic.steps[1].depends_on, ["a"], "c waits for what b waited for");
}

#[test]
fn branch_patterns() {
    let when = |p: &str| When {
        branch: vec![p.to_owned()],
        event: vec![],
    };
    assert!(when("release/*").matches(Some("release/1.0"), Trigger::Push));
    assert!(!when("release/*").matches(Some("release/1.0/hotfix"), Trigger::Push));
    assert!(when("release/**").matches(Some("release/1.0/hotfix"), Trigger::Push));
    assert!(when("*").matches(Some("main"), Trigger::Push));
    assert!(!when("main").matches(Some("mainline"), Trigger::Push));
    assert!(!when("main").matches(None, Trigger::Manual));
    let events = When {
        branch: vec![],
        event: vec![Trigger::PullRequest],
    };
    assert!(events.matches(Some("x"), Trigger::PullRequest));
    assert!(!events.matches(Some("x"), Trigger::Push));
    // Many stars cannot make matching slow (this would not finish if they
    // did).
    assert!(!when(&"*a".repeat(60)).matches(Some(&format!("{}b", "a".repeat(250))), Trigger::Push));
    assert!(!when(&"**a".repeat(60)).matches(Some(&format!("{}b", "a/".repeat(120))), Trigger::Push));
}

#[test]
fn the_script_echoes_each_command_and_stops_at_the_first_failure() {
    let s = script(&["echo 'hi'".to_owned(), "make\nmake install".to_owned()]);
    assert_eq!(
        s,
        "set -e\nprintf '%s\\n' '+ echo '\\''hi'\\'''\necho 'hi'\nprintf '%s\\n' '+ make ...'\nmake\nmake install\n"
    );
}

#[test]
fn one_command_is_a_one_step_pipeline() {
    let p = Pipeline::single("sh build.sh");
    assert_eq!(names(&p), ["build"]);
    assert_eq!(p.steps[0].commands, ["sh build.sh"]);
}

/// What the queue stores for a step: its environment exported (quoted),
/// its commands as one script, the Docker label for an image, its retries
/// and their causes, and its services.
#[test]
fn steps_become_what_the_queue_stores() {
    let p = parse(FULL).unwrap();
    let test = p.steps.iter().find(|s| s.name == "test (rust=1.85)").unwrap();
    let n = test.to_new_step();
    assert!(
        n.command
            .starts_with("export CARGO_TERM_COLOR='always'\nexport RUST_LOG='debug'\nset -e\n"),
        "{}",
        n.command
    );
    assert_eq!(n.retries, 2);
    assert_eq!(
        n.retry_on,
        crate::model::RetryOn {
            failure: true,
            timeout: false,
            agent_lost: true
        }
    );
    assert_eq!(n.timeout_ms, Some(30 * 60 * 1000));
    assert_eq!(n.labels.iter().collect::<Vec<_>>(), ["os=linux"]);
    assert_eq!(n.depends_on, ["build (rust=1.85)"]);
    assert_eq!(n.matrix.get("rust").map(String::as_str), Some("1.85"));

    let lint = p.steps.iter().find(|s| s.base == "lint").unwrap().to_new_step();
    assert_eq!(
        lint.labels.iter().collect::<Vec<_>>(),
        [DOCKER_LABEL],
        "an image needs the Docker runner"
    );
    assert!(
        lint.command.starts_with("export CARGO_TERM_COLOR"),
        "{}",
        lint.command
    );
    assert_eq!(lint.services.len(), 1);
    assert_eq!(
        (lint.services[0].name.as_str(), lint.services[0].image.as_str()),
        ("cache", "redis:7")
    );
    assert_eq!(
        (lint.retries, lint.retry_on),
        (0, crate::model::RetryOn::default()),
        "no retry: lost agents unbounded, nothing else"
    );

    let every = parse("version: 1\nsteps:\n  - name: a\n    commands: [x]\n    retry: {limit: 3}\n")
        .unwrap()
        .to_new_steps();
    assert_eq!(
        (every[0].retries, every[0].retry_on),
        (3, crate::model::RetryOn::ALL),
        "no causes listed: every cause"
    );

    let quoted =
        parse("version: 1\nenv: { A: \"it's $HOME\" }\nsteps:\n  - name: a\n    commands: [\"echo $A\"]\n")
            .unwrap()
            .to_new_steps();
    assert!(
        quoted[0].command.starts_with("export A='it'\\''s $HOME'\n"),
        "{}",
        quoted[0].command
    );
    let only_lost = parse(
        "version: 1\nsteps:\n  - name: a\n    retry: { limit: 3, on: [agent_lost] }\n    commands: [x]\n",
    )
    .unwrap()
    .to_new_steps();
    assert_eq!(
        (only_lost[0].retries, only_lost[0].retry_on),
        (
            3,
            crate::model::RetryOn {
                failure: false,
                timeout: false,
                agent_lost: true
            }
        ),
        "lost agents spend the retries; failures do not run again"
    );
}
