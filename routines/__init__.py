"""Routines: an agent scheduler on Azure Functions and Azure Storage."""
