"""Operations (issue 14): the scheduler, alarms and events, silences and inhibition, notification.

schedule   when things run: cron expressions or aliases in the site's time zone, catch-up, no overlap
alarms     the state of (type, object): raise, repeat, acknowledge, clear, history; silences; inhibition
notify     a command or webhook told of new critical and major alarms, retried, never blocking
model      the records front ends receive (api.AlarmInfo, api.SilenceInfo, api.EventInfo, api.ScheduleInfo)
service    the engine's side of it: one Ops per EngineClient, the scheduler loop the engine service runs
"""
