//! The built-in region table: six regions and the round-trip times between them.
//!
//! The numbers are approximate public inter-region RTTs: rounded medians of the kind published by
//! cloud providers' inter-region latency dashboards and public ping tables (for example between
//! Virginia, Oregon, Ireland, Tokyo, Singapore and São Paulo data centres), in milliseconds. They
//! are backbone figures between data centres; a node's own last mile is added per class
//! (`access_rtt_ms`). Replace them with your own measurements in `[network]` when you have them.

/// (name, UTC offset in hours) of each built-in region, in matrix order.
pub const DEFAULT_REGIONS: [(&str, f64); 6] = [
    ("us-east", -5.0),
    ("us-west", -8.0),
    ("eu-west", 0.0),
    ("ap-northeast", 9.0),
    ("ap-southeast", 8.0),
    ("sa-east", -3.0),
];

/// Round-trip times in milliseconds between the regions above (symmetric; the diagonal is the RTT
/// between two hosts in the same region).
pub const DEFAULT_RTT_MS: [[f64; 6]; 6] = [
    // us-east us-west eu-west ap-ne  ap-se  sa-east
    [6.0, 65.0, 75.0, 150.0, 215.0, 115.0],   // us-east
    [65.0, 6.0, 135.0, 100.0, 165.0, 175.0],  // us-west
    [75.0, 135.0, 6.0, 210.0, 175.0, 180.0],  // eu-west
    [150.0, 100.0, 210.0, 6.0, 70.0, 255.0],  // ap-northeast
    [215.0, 165.0, 175.0, 70.0, 6.0, 325.0],  // ap-southeast
    [115.0, 175.0, 180.0, 255.0, 325.0, 6.0], // sa-east
];

/// The built-in RTT between two named regions, if both are in the table.
pub fn default_rtt(a: &str, b: &str) -> Option<f64> {
    let i = DEFAULT_REGIONS.iter().position(|(n, _)| *n == a)?;
    let j = DEFAULT_REGIONS.iter().position(|(n, _)| *n == b)?;
    Some(DEFAULT_RTT_MS[i][j])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_in_rtt_matrix_is_symmetric_and_positive() {
        for (i, row) in DEFAULT_RTT_MS.iter().enumerate() {
            for (j, v) in row.iter().enumerate() {
                assert_eq!(*v, DEFAULT_RTT_MS[j][i]);
                assert!(*v > 0.0);
            }
        }
        assert_eq!(default_rtt("eu-west", "us-east"), Some(75.0));
        assert_eq!(default_rtt("eu-west", "mars"), None);
    }
}
