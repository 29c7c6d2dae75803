"""The report stage: records -> tables and pages."""
