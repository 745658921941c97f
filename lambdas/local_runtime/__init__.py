"""Local stand-ins for AWS services, so the whole of FLStore runs on one machine."""
