"""What users call from their own code: the HTTP client, the end-of-round writer and the job
declaration API."""
