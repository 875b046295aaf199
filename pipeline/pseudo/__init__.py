"""Pseudo labels: the teacher's pass, the Parquet files, the student's selection."""
