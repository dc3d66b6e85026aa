"""Server migration projects (issue 13): plans and waves, the records as stored, the assessment."""
