//! The file as written: what serde reads, before any check that needs
//! more than one value. Every key is known; anything else is an error.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_saphyr::Spanned;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct File {
    pub version: Spanned<u32>,
    #[serde(default)]
    pub env: Option<Spanned<BTreeMap<String, String>>>,
    #[serde(default)]
    pub matrix: Option<Spanned<BTreeMap<String, Vec<String>>>>,
    pub steps: Spanned<Vec<Step>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Step {
    pub name: Spanned<String>,
    #[serde(default)]
    pub image: Option<Spanned<String>>,
    pub commands: Spanned<Vec<String>>,
    #[serde(default)]
    pub depends_on: Option<Vec<Spanned<String>>>,
    #[serde(default)]
    pub env: Option<Spanned<BTreeMap<String, String>>>,
    #[serde(default)]
    pub agents: Option<Spanned<BTreeMap<String, String>>>,
    #[serde(default)]
    pub timeout: Option<Spanned<String>>,
    #[serde(default)]
    pub retry: Option<Spanned<Retry>>,
    #[serde(default)]
    pub when: Option<When>,
    #[serde(default)]
    pub allow_failure: bool,
    #[serde(default)]
    pub services: Option<Spanned<BTreeMap<String, Service>>>,
    #[serde(default)]
    pub secrets: Option<Spanned<Vec<String>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Retry {
    pub limit: u32,
    #[serde(default)]
    pub on: Vec<super::RetryOn>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct When {
    #[serde(default)]
    pub branch: Vec<Spanned<String>>,
    #[serde(default)]
    pub event: Vec<super::Trigger>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Service {
    pub image: Spanned<String>,
    #[serde(default)]
    pub env: Option<Spanned<BTreeMap<String, String>>>,
    #[serde(default)]
    pub command: Option<Spanned<Vec<String>>>,
}
