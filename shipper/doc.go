// Package shipper will send staged cycle files to a replica over mutually
// authenticated TLS (issue 3): schedule, resumable uploads, throttling,
// retries. Nothing is implemented yet.
package shipper
