"""Observability: NVML GPU exporter, Prometheus scrape configuration and rules,
Grafana dashboards, and the capacity report read back from Prometheus."""
