"""The eval stage: masks -> metrics -> result records."""
