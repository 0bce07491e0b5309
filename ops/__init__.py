"""Heavy operations of AnomalyForge: plain Python + torch, no Dagster import (DESIGN §2)."""
