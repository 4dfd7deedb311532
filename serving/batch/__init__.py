"""Bulk triage of OpenAI Batch files: records and output log, line parsing, the run, and the
Ray Data engine."""
