//! Money as integer micro-dollars (1 USD = 1,000,000), never floating point: spend and budgets are
//! added up millions of times and must compare exactly.

use serde::{Deserialize, Serialize};

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct MicroUsd(pub i64);

impl MicroUsd {
    pub const ZERO: MicroUsd = MicroUsd(0);

    /// Parses a USD amount such as `12.5` into micro-dollars (rounded to the nearest micro-dollar).
    pub fn from_usd(usd: f64) -> Option<Self> {
        (0.0..9.0e12)
            .contains(&usd)
            .then(|| Self((usd * 1e6).round() as i64))
    }

    /// Cost of `tokens` tokens priced at `usd_per_million` USD per one million tokens, rounded up
    /// so a reservation is never smaller than the charge. The price is turned into an integer
    /// (micro-dollars per million tokens) once; the arithmetic after that is exact.
    pub fn for_tokens(tokens: u64, usd_per_million: f64) -> Self {
        let micro_per_million = (usd_per_million * 1e6).round() as i128;
        let micro = (tokens as i128 * micro_per_million + 999_999) / 1_000_000;
        Self(micro.min(i64::MAX as i128) as i64)
    }

    pub fn as_usd_string(self) -> String {
        format!("{}.{:06}", self.0 / 1_000_000, self.0 % 1_000_000)
    }
}

impl std::ops::Add for MicroUsd {
    type Output = MicroUsd;
    fn add(self, rhs: MicroUsd) -> MicroUsd {
        MicroUsd(self.0.saturating_add(rhs.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_cost_rounds_up_and_is_exact() {
        // 2.5 USD per 1M tokens: 1M tokens cost 2.5 USD, 1 token costs 2.5 micro-USD -> 3.
        assert_eq!(MicroUsd::for_tokens(1_000_000, 2.5), MicroUsd(2_500_000));
        assert_eq!(MicroUsd::for_tokens(1, 2.5), MicroUsd(3));
        assert_eq!(MicroUsd::for_tokens(0, 2.5), MicroUsd::ZERO);
        assert_eq!(MicroUsd::for_tokens(10, 0.0), MicroUsd::ZERO);
    }

    #[test]
    fn usd_parsing() {
        assert_eq!(MicroUsd::from_usd(12.5), Some(MicroUsd(12_500_000)));
        assert_eq!(MicroUsd::from_usd(-1.0), None);
        assert_eq!(MicroUsd(12_500_001).as_usd_string(), "12.500001");
    }
}
