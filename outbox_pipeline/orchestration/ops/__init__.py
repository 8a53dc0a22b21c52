"""The ops of each relay's jobs: extract, load and mark; follow; replay; retention; maintenance."""
