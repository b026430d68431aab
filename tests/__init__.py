"""Tests for the pipeline package."""
